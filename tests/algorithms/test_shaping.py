"""DAPO overlong penalty and dynamic-sampling filter: hand values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.algorithms.shaping import dynamic_sampling_keep, overlong_penalty


def test_overlong_penalty_hand_values() -> None:
    lengths = torch.tensor([10, 15, 16, 17, 20, 21, 100])
    penalty = overlong_penalty(lengths, max_length=20, buffer_length=5)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.2, -0.4, -1.0, -1.0, -1.0]))
    penalty = overlong_penalty(lengths, max_length=20, buffer_length=5, penalty_factor=2.0)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.4, -0.8, -2.0, -2.0, -2.0]))
    assert penalty.dtype == torch.float32


def test_overlong_penalty_whole_length_buffer() -> None:
    penalty = overlong_penalty(torch.tensor([0.0, 2.0, 4.0, 5.0]), max_length=4, buffer_length=4)
    torch.testing.assert_close(penalty, torch.tensor([0.0, -0.5, -1.0, -1.0]))


@pytest.mark.parametrize("buffer_length", [0, -1, 21])
def test_overlong_penalty_rejects_bad_buffer(buffer_length: int) -> None:
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(torch.tensor([1]), max_length=20, buffer_length=buffer_length)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 60), min_size=1, max_size=20),
    st.integers(1, 30),
    st.integers(1, 30),
)
def test_overlong_penalty_is_monotone_and_bounded(lengths: list[int], max_length: int, buffer: int) -> None:
    buffer = min(buffer, max_length)
    ordered = torch.tensor(sorted(lengths))
    penalty = overlong_penalty(ordered, max_length=max_length, buffer_length=buffer)
    assert torch.all(penalty <= 0) and torch.all(penalty >= -1)
    assert torch.all(penalty[1:] <= penalty[:-1])


def test_dynamic_sampling_keep_hand_values() -> None:
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.2, 0.7])
    group_ids = torch.tensor([4, 4, 4, 9, 9, 9, 2, 2, 2, 7, 7])
    # group 4 mixed, 9 all correct, 2 mixed (0, 0, 0.5), 7 mixed
    expected = torch.tensor([True, True, True, False, False, False, True, True, True, True, True])
    assert torch.equal(dynamic_sampling_keep(scores, group_ids), expected)


def test_dynamic_sampling_keep_drops_all_wrong_and_singletons_and_interleaving_is_fine() -> None:
    scores = torch.tensor([0.0, 1.0, 0.0, 0.0, 3.0])
    group_ids = torch.tensor([0, 1, 0, 1, 5])
    keep = dynamic_sampling_keep(scores, group_ids)
    assert keep.dtype == torch.bool
    assert torch.equal(keep, torch.tensor([False, True, False, True, False]))
    assert dynamic_sampling_keep(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.sampled_from([0.0, 1.0])), min_size=1, max_size=24))
def test_dynamic_sampling_keep_matches_group_definition(rows: list[tuple[int, float]]) -> None:
    group_ids = torch.tensor([g for g, _ in rows])
    scores = torch.tensor([s for _, s in rows])
    keep = dynamic_sampling_keep(scores, group_ids)
    for i, (group, _) in enumerate(rows):
        members = {s for g, s in rows if g == group}
        assert bool(keep[i]) == (len(members) > 1)
