"""Masked reductions: hand values, empty masks (0, never NaN), mask dtypes, gradients, properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.algorithms.masked import (
    masked_max,
    masked_mean,
    masked_min,
    masked_sum,
    masked_var,
    masked_whiten,
)

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
# counted entries: 1, 2 and 5 (sum 8, mean 8/3, squared deviations 25/9 + 4/9 + 49/9 = 26/3)
MASK = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
EMPTY = torch.zeros(2, 3)


def _close(actual: torch.Tensor, expected: float | list, **kwargs: float) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), **kwargs)


def test_masked_sum_hand_values() -> None:
    _close(masked_sum(VALUES, MASK), 8.0)
    _close(masked_sum(VALUES, MASK, dim=1), [3.0, 5.0])
    _close(masked_sum(VALUES, MASK, dim=0), [1.0, 7.0, 0.0])


def test_masked_mean_hand_values_and_empty_rows_give_zero() -> None:
    _close(masked_mean(VALUES, MASK), 8.0 / 3.0)
    _close(masked_mean(VALUES, MASK, dim=1), [1.5, 5.0])
    # column 2 has no counted entry: 0, not NaN
    _close(masked_mean(VALUES, MASK, dim=0), [1.0, 3.5, 0.0])
    _close(masked_mean(VALUES, MASK, dim=-1), [1.5, 5.0])


def test_masked_var_hand_values() -> None:
    _close(masked_var(VALUES, MASK), (26.0 / 3.0) / 2.0)  # Bessel: divide by n - 1 = 2
    _close(masked_var(VALUES, MASK, unbiased=False), (26.0 / 3.0) / 3.0)


def test_masked_var_of_one_entry_is_zero_both_ways() -> None:
    one = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    _close(masked_var(VALUES, one), 0.0)
    _close(masked_var(VALUES, one, unbiased=False), 0.0)


def test_masked_whiten_hand_values() -> None:
    mean, std = 8.0 / 3.0, math.sqrt(13.0 / 3.0)
    expected = [[(1 - mean) / std, (2 - mean) / std, 0.0], [0.0, (5 - mean) / std, 0.0]]
    _close(masked_whiten(VALUES, MASK), expected, atol=1e-6, rtol=1e-5)


def test_masked_whiten_without_mean_shift_keeps_the_mean() -> None:
    mean, std = 8.0 / 3.0, math.sqrt(13.0 / 3.0)
    expected = [[(1 - mean) / std + mean, (2 - mean) / std + mean, 0.0], [0.0, (5 - mean) / std + mean, 0.0]]
    out = masked_whiten(VALUES, MASK, shift_mean=False)
    _close(out, expected, atol=1e-6, rtol=1e-5)
    _close(masked_mean(out, MASK), mean, atol=1e-6, rtol=1e-5)


def test_masked_max_and_min_ignore_uncounted_entries() -> None:
    _close(masked_max(VALUES, MASK), 5.0)  # 6 is larger but not counted
    _close(masked_min(VALUES, MASK), 1.0)
    negative = -VALUES
    # all counted values negative: the max is the largest of them, not 0
    _close(masked_max(negative, MASK), -1.0)
    _close(masked_min(negative, MASK), -5.0)


@pytest.mark.parametrize(
    "reduce",
    [
        masked_sum,
        masked_mean,
        masked_var,
        lambda v, m: masked_var(v, m, unbiased=False),
        masked_max,
        masked_min,
    ],
    ids=["sum", "mean", "var", "var-biased", "max", "min"],
)
def test_every_reduction_of_an_empty_mask_is_zero(reduce) -> None:
    out = reduce(VALUES, EMPTY)
    assert out.shape == ()
    assert out.item() == 0.0


def test_whiten_of_an_empty_mask_is_all_zero_and_finite() -> None:
    out = masked_whiten(VALUES, EMPTY)
    assert torch.isfinite(out).all()
    assert (out == 0).all()


def test_whiten_of_a_single_entry_is_zero_not_huge() -> None:
    one = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    out = masked_whiten(VALUES, one)
    assert torch.isfinite(out).all() and (out == 0).all()


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.float32])
def test_masks_of_any_dtype_give_the_same_results(dtype: torch.dtype) -> None:
    mask = MASK.to(dtype)
    _close(masked_sum(VALUES, mask), 8.0)
    _close(masked_mean(VALUES, mask), 8.0 / 3.0)
    _close(masked_mean(VALUES, mask, dim=0), [1.0, 3.5, 0.0])
    _close(masked_var(VALUES, mask), 13.0 / 3.0)
    _close(masked_max(VALUES, mask), 5.0)
    _close(masked_min(VALUES, mask), 1.0)
    torch.testing.assert_close(masked_whiten(VALUES, mask), masked_whiten(VALUES, MASK))


def test_masked_mean_gradient_is_mask_over_count() -> None:
    values = VALUES.clone().double().requires_grad_(True)
    masked_mean(values, MASK.double()).backward()
    torch.testing.assert_close(values.grad, MASK.double() / 3.0)


def test_masked_mean_with_empty_mask_has_zero_gradient() -> None:
    values = VALUES.clone().requires_grad_(True)
    masked_mean(values, EMPTY).backward()
    assert values.grad is not None and (values.grad == 0).all()


def test_whiten_passes_gradcheck() -> None:
    values = torch.tensor([[0.3, -1.2, 2.0], [0.7, 1.1, -0.4]], dtype=torch.double, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.double)
    assert torch.autograd.gradcheck(lambda v: masked_whiten(v, mask), (values,))
    assert torch.autograd.gradcheck(lambda v: masked_var(v, mask), (values,))


# ------------------------------------------------------------------------- properties

_rows = st.integers(1, 4)
_cols = st.integers(1, 5)


@st.composite
def _values_and_mask(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = draw(_rows), draw(_cols)
    floats = st.floats(-100, 100, allow_nan=False, width=32)
    values = torch.tensor(draw(st.lists(floats, min_size=rows * cols, max_size=rows * cols)))
    bits = draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
    return values.view(rows, cols), torch.tensor(bits, dtype=torch.float32).view(rows, cols)


@settings(max_examples=60, deadline=None)
@given(_values_and_mask(), st.floats(-1e3, 1e3, allow_nan=False, width=32))
def test_uncounted_entries_never_change_a_reduction(data, fill: float) -> None:
    values, mask = data
    changed = torch.where(mask > 0, values, torch.full_like(values, fill))
    for reduce in (masked_sum, masked_mean, masked_var, masked_max, masked_min):
        torch.testing.assert_close(reduce(changed, mask), reduce(values, mask))
    torch.testing.assert_close(masked_whiten(changed, mask), masked_whiten(values, mask))


@settings(max_examples=60, deadline=None)
@given(_values_and_mask())
def test_reductions_match_plain_torch_on_the_selected_entries(data) -> None:
    values, mask = data
    selected = values[mask > 0].double()
    n = selected.numel()
    expected_sum = selected.sum() if n else torch.tensor(0.0, dtype=torch.double)
    expected_mean = selected.mean() if n else torch.tensor(0.0, dtype=torch.double)
    expected_var = selected.var(unbiased=True) if n > 1 else torch.tensor(0.0, dtype=torch.double)
    tol = {"atol": 1e-3, "rtol": 1e-4}
    torch.testing.assert_close(masked_sum(values, mask).double(), expected_sum, **tol)
    torch.testing.assert_close(masked_mean(values, mask).double(), expected_mean, **tol)
    torch.testing.assert_close(masked_var(values, mask).double(), expected_var, atol=1e-2, rtol=1e-3)
    if n:
        assert masked_max(values, mask).item() == selected.max().item()
        assert masked_min(values, mask).item() == selected.min().item()
    # row means: each row of the selection, 0 for rows with nothing selected
    row_means = masked_mean(values, mask, dim=1)
    for row in range(values.shape[0]):
        picked = values[row][mask[row] > 0].double()
        expected = picked.mean() if picked.numel() else torch.tensor(0.0, dtype=torch.double)
        torch.testing.assert_close(row_means[row].double(), expected, **tol)


@settings(max_examples=60, deadline=None)
@given(_values_and_mask())
def test_whitened_entries_have_mean_zero_and_unit_variance(data) -> None:
    values, mask = data
    values = values.double()
    mask = mask.double()
    out = masked_whiten(values, mask)
    assert torch.isfinite(out).all()
    assert (out[mask == 0] == 0).all()
    n = int(mask.sum())
    spread = masked_var(values, mask)
    if n >= 2 and spread > 1e-3:
        assert abs(masked_mean(out, mask).item()) < 1e-6
        assert abs(masked_var(out, mask).item() - 1.0) < 1e-4


def test_non_finite_values_where_the_mask_is_zero_are_ignored() -> None:
    values = torch.tensor([[1.0, float("inf")], [float("nan"), 3.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert masked_sum(values, mask).item() == 4.0
    assert masked_mean(values, mask).item() == 2.0
    torch.testing.assert_close(
        masked_whiten(values, mask), torch.tensor([[-0.7071, 0.0], [0.0, 0.7071]]), atol=1e-4, rtol=0
    )
    masked_mean(values, mask).backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.5, 0.0], [0.0, 0.5]]))
