"""Rollouts ``[time, envs]`` <-> padded rows ``[rows, length]``, one row per episode piece.

A vector-env rollout is a ``[T, N]`` grid whose columns contain several episodes. The advantage
estimators of ``posttrain.algorithms`` have no per-step ``done`` input: they take rows that each end
either with the episode (bootstrap 0) or with a cut (bootstrap V(s_next)). This is exactly how the
sub-traces of an LLM agent episode are laid out, so a column is split at every episode end into
separate rows, padded with ``loss_mask = 0``:

* termination        -> the row ends, ``bootstrap_values = 0``;
* time-limit truncation -> the row ends, ``bootstrap_values = V(final observation)``;
* the rollout's cut-off at step T-1 -> the row ends, ``bootstrap_values = V(next observation)``.

(Pardo et al. 2018, "Time Limits in Reinforcement Learning": truncation must bootstrap.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SegmentLayout:
    """Where each entry of a ``[T, N]`` rollout lives in the padded ``[rows, length]`` layout.

    ``flat_index[r, k]`` is the time-major flat index ``t * N + n`` of the k-th step of row r
    (0 on padding), ``loss_mask[r, k]`` is 1.0 on real steps, ``last_index[r]`` is the flat index
    of the row's final step.
    """

    num_steps: int
    num_envs: int
    flat_index: Tensor  # [rows, length] int64
    loss_mask: Tensor  # [rows, length] float32
    last_index: Tensor  # [rows] int64

    @staticmethod
    def from_dones(dones: Tensor) -> SegmentLayout:
        """Split every column of ``dones [T, N]`` (bool: the episode ended at step t) into rows.

        Rows are ordered env by env, then by time; the rollout's last step always closes a row.
        """
        num_steps, num_envs = dones.shape
        ends = dones.to(torch.bool).clone()
        ends[-1, :] = True
        ends_env_major = ends.t().reshape(-1)  # position p = n * T + t
        starts = torch.cat([ends_env_major.new_ones(1), ends_env_major[:-1]])
        row_of = torch.cumsum(starts.long(), 0) - 1
        num_rows = int(row_of[-1]) + 1
        lengths = torch.bincount(row_of, minlength=num_rows)
        row_start = torch.cumsum(lengths, 0) - lengths
        positions = torch.arange(num_steps * num_envs)
        offset = positions - row_start[row_of]
        time_major = (positions % num_steps) * num_envs + positions // num_steps
        length = int(lengths.max())
        flat_index = torch.zeros(num_rows, length, dtype=torch.long)
        loss_mask = torch.zeros(num_rows, length)
        flat_index[row_of, offset] = time_major
        loss_mask[row_of, offset] = 1.0
        last_index = flat_index[torch.arange(num_rows), lengths - 1]
        return SegmentLayout(num_steps, num_envs, flat_index, loss_mask, last_index)

    def to_rows(self, grid: Tensor) -> Tensor:
        """``[T, N]`` -> ``[rows, length]``, 0 on padding."""
        return grid.reshape(-1)[self.flat_index] * self.loss_mask.to(grid.dtype)

    def to_time(self, rows: Tensor) -> Tensor:
        """Inverse of ``to_rows``: ``[rows, length]`` -> ``[T, N]`` (padding is dropped)."""
        real = self.loss_mask > 0
        grid = rows.new_zeros(self.num_steps * self.num_envs)
        grid[self.flat_index[real]] = rows[real]
        return grid.reshape(self.num_steps, self.num_envs)

    def at_row_ends(self, grid: Tensor) -> Tensor:
        """The ``[T, N]`` entry at each row's last step -> ``[rows]``."""
        return grid.reshape(-1)[self.last_index]


def bootstrap_grid(
    terminated: Tensor,
    truncated: Tensor,
    final_values: Tensor,
    next_values: Tensor,
) -> Tensor:
    """V(state after step t) where a row may end at step t, as a ``[T, N]`` grid.

    terminated, truncated: ``[T, N]`` bool; final_values: ``[T, N]`` V(final observation), read only
    where truncated; next_values: ``[N]`` V(observation after the last step). Termination wins over
    truncation (the episode really ended): 0 there. Elsewhere the grid is 0 except on the last step.
    """
    grid = torch.zeros_like(final_values)
    grid[-1] = next_values
    grid = torch.where(truncated, final_values, grid)
    return torch.where(terminated, torch.zeros_like(grid), grid)
