"""Masked reductions over ``[batch, time]`` tensors.

A mask is 1 where a token counts (a trainable action token) and 0 elsewhere (prompt, tool output,
padding). All reductions are safe on empty masks: they return 0 rather than NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(values * mask) over ``dim`` (all elements when ``dim`` is None); entries where the mask
    is 0 are ignored even when they are inf or NaN (padding may hold anything)."""
    prod = torch.where(mask != 0, values * mask, torch.zeros_like(values))
    return prod.sum() if dim is None else prod.sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(values * mask) / max(sum(mask), 1): the mean over counted entries, 0 when none count."""
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over counted entries (Bessel-corrected when ``unbiased`` and more than one entry)."""
    mean = masked_mean(values, mask)
    sq = masked_sum((values - mean) ** 2, mask)
    count = mask.sum()
    denom = (count - 1) if unbiased and count > 1 else count
    return sq / denom.clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over counted entries; uncounted entries are set to 0."""
    mean = masked_mean(values, mask)
    var = masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened * mask, torch.zeros_like(whitened))


def masked_max(values: Tensor, mask: Tensor) -> Tensor:
    """Largest counted entry; 0 when nothing counts."""
    if not bool(mask.any()):
        return values.new_zeros(())
    return values.masked_fill(mask == 0, float("-inf")).max()


def masked_min(values: Tensor, mask: Tensor) -> Tensor:
    """Smallest counted entry; 0 when nothing counts."""
    if not bool(mask.any()):
        return values.new_zeros(())
    return values.masked_fill(mask == 0, float("inf")).min()
