"""On-policy distillation: the teacher's per-token log-probs as the learning signal.

The student samples; a teacher scores every sampled token; the per-token reverse KL estimate
log pi_student(a_t) - log pi_teacher(a_t) is a (negative) reward that needs no verifier. As an
advantage estimator it runs with every policy loss and aggregation of the core: the ``distill``
preset uses it alone, and ``distill.coef`` adds it to any RL preset's advantage.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.algorithms.advantages import _trainable_scan
from posttrain.algorithms.registry import ADVANTAGES


def teacher_signal(old_logprobs: Tensor, teacher_logprobs: Tensor, loss_mask: Tensor) -> Tensor:
    """d_t = log pi_teacher(a_t | s_t) - log pi_student(a_t | s_t) on trainable tokens, 0 elsewhere.

    -d_t is the single-sample estimate of the reverse KL(pi_student || pi_teacher) at token t: its
    mean over the student's own samples is the reverse KL the student minimises. Entries off the
    mask are 0 whatever they hold (padding and tool output may carry -inf or NaN). ``[batch, time]``.
    """
    trainable = loss_mask > 0
    return torch.where(trainable, teacher_logprobs - old_logprobs, torch.zeros_like(old_logprobs))


@ADVANTAGES.register("reverse_kl")
@torch.no_grad()
def reverse_kl(
    token_rewards: Tensor,
    loss_mask: Tensor,
    *,
    old_logprobs: Tensor,
    teacher_logprobs: Tensor,
    episode_ids: Tensor | None = None,
    segment_index: Tensor | None = None,
    gamma: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Reverse-KL distillation advantage (Agarwal et al. 2024, GKD; Gu et al. 2024, MiniLLM;
    Thinking Machines 2025, on-policy distillation).

    A_t = sum_{k >= 0} gamma^k d_{t+k}, d_t = log pi_teacher(a_t) - log pi_old(a_t), where t steps
    over the trainable tokens of an episode (its sub-traces chained in ``segment_index`` order, as
    in ``gae``). ``gamma = 0`` (default) gives the per-token signal A_t = d_t (Thinking Machines);
    ``gamma > 0`` also credits a token with the teacher's verdict on what follows it (MiniLLM's
    discounted sum of future per-token terms). The task reward (``token_rewards``) is not read: the
    teacher is the only judge. Returns (advantages, returns = advantages), ``[batch, time]``, 0 off
    the mask.
    """
    del token_rewards  # pure distillation: no verifier
    signal = teacher_signal(old_logprobs, teacher_logprobs, loss_mask)
    if gamma == 0.0:
        return signal, signal.clone()
    trainable = loss_mask > 0
    zeros = torch.zeros_like(signal)
    advantages = _trainable_scan(
        signal, trainable, zeros, zeros[:, 0], episode_ids, segment_index, gamma, 1.0
    )
    advantages = torch.where(trainable, advantages, zeros)
    return advantages, advantages.clone()
