"""Actor and critic MLPs for gymnasium control: categorical or diagonal-Gaussian policies.

Separate actor and critic, two hidden layers of 64 tanh units, orthogonal initialisation with gain
sqrt(2) for hidden layers, 0.01 for the policy head and 1 for the value head (Andrychowicz et al.
2021, "What Matters In On-Policy RL"); the Gaussian log-std is a state-independent parameter.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

LOG_2PI = math.log(2.0 * math.pi)


def _layer(fan_in: int, fan_out: int, gain: float) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out)
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def mlp(obs_dim: int, out_dim: int, hidden: int, out_gain: float) -> nn.Sequential:
    """obs -> tanh(64) -> tanh(64) -> out."""
    gain = math.sqrt(2.0)
    return nn.Sequential(
        _layer(obs_dim, hidden, gain),
        nn.Tanh(),
        _layer(hidden, hidden, gain),
        nn.Tanh(),
        _layer(hidden, out_dim, out_gain),
    )


class Agent(nn.Module):
    """Policy pi(a | s) and, when ``with_critic``, value V(s). Observations are ``[N, obs_dim]``."""

    def __init__(
        self, obs_dim: int, action_dim: int, continuous: bool, hidden: int = 64, with_critic: bool = True
    ) -> None:
        super().__init__()
        self.continuous = continuous
        self.actor = mlp(obs_dim, action_dim, hidden, out_gain=0.01)
        self.critic = mlp(obs_dim, 1, hidden, out_gain=1.0) if with_critic else None
        self.log_std = nn.Parameter(torch.zeros(action_dim)) if continuous else None

    def value(self, obs: Tensor) -> Tensor:
        """V(s) ``[N]``; zeros for a critic-free agent."""
        if self.critic is None:
            return obs.new_zeros(obs.shape[0])
        return self.critic(obs).squeeze(-1)

    def act(self, obs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sample actions: (actions, log pi(a|s) ``[N]``, V(s) ``[N]``); call under no_grad."""
        out = self.actor(obs)
        if self.log_std is not None:
            std = self.log_std.exp()
            actions = out + std * torch.randn_like(out)
            logprobs = gaussian_logprob(actions, out, self.log_std)
        else:
            log_probs_all = torch.log_softmax(out, dim=-1)
            # Gumbel-max: argmax(logits + Gumbel noise) is a categorical sample, ~3x cheaper than
            # torch.multinomial on tiny batches; -log(Exp(1)) is Gumbel(0, 1).
            actions = (out - torch.empty_like(out).exponential_().log()).argmax(-1)
            logprobs = log_probs_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        return actions, logprobs, self.value(obs)

    def evaluate(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(log pi(a|s), entropy, V(s)), each ``[N]``, with gradients."""
        out = self.actor(obs)
        if self.log_std is not None:
            logprobs = gaussian_logprob(actions, out, self.log_std)
            entropy = (0.5 * (1.0 + LOG_2PI) + self.log_std).sum().expand(obs.shape[0])
        else:
            log_probs_all = torch.log_softmax(out, dim=-1)
            logprobs = log_probs_all.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
            entropy = -(log_probs_all.exp() * log_probs_all).sum(-1)
        return logprobs, entropy, self.value(obs)


def gaussian_logprob(actions: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log N(a; mean, diag(exp(log_std))^2) summed over action dims: ``[N, A]`` -> ``[N]``."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * LOG_2PI).sum(-1)
