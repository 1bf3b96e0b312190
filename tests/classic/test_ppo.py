import pytest
import torch

from posttrain.classic.config import make_config
from posttrain.classic.policy import Agent, gaussian_logprob
from posttrain.classic.ppo import Samples, minibatch_loss, train_ppo


def test_gaussian_logprob_matches_torch() -> None:
    mean, log_std = torch.randn(5, 3), torch.randn(3)
    actions = torch.randn(5, 3)
    reference = torch.distributions.Normal(mean, log_std.exp()).log_prob(actions).sum(-1)
    assert torch.allclose(gaussian_logprob(actions, mean, log_std), reference, atol=1e-5)


@pytest.mark.parametrize("continuous", [False, True])
def test_on_policy_loss_gradient_is_policy_gradient(continuous: bool) -> None:
    """At ratio 1, d(loss)/d(theta) of the clipped surrogate = -mean(A * grad log pi)."""
    torch.manual_seed(0)
    agent = Agent(4, 2, continuous)
    obs = torch.randn(8, 4)
    with torch.no_grad():
        actions, logprobs, values = agent.act(obs)
    advantages = torch.randn(8)
    config = make_config("CartPole-v1", "ppo", ent_coef=0.0, vf_coef=0.0, norm_adv=False)
    samples = Samples(obs, actions, logprobs, advantages, values, values)
    loss = minibatch_loss(agent, samples, config, with_critic=True)
    grad = torch.autograd.grad(loss, list(agent.actor.parameters()))
    new_logprobs, _, _ = agent.evaluate(obs, actions)
    reference = torch.autograd.grad(-(advantages * new_logprobs).mean(), list(agent.actor.parameters()))
    for g, r in zip(grad, reference):
        assert torch.allclose(g, r, atol=1e-6)


@pytest.mark.slow
def test_short_ppo_run_beats_random_policy() -> None:
    result = train_ppo(make_config("CartPole-v1", "ppo", total_steps=25_000, seed=0))
    assert result.steps >= 25_000
    assert result.final_return > 60  # a uniformly random policy averages about 22 (seed 0: ~89)
