import torch

from posttrain.classic.policy import Agent


def test_categorical_samples_follow_softmax() -> None:
    torch.manual_seed(0)
    agent = Agent(3, 3, continuous=False)
    head = agent.actor[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([2.0, 0.0, -1.0]))
        actions, logprobs, values = agent.act(torch.randn(40_000, 3))
    expected = torch.softmax(torch.tensor([2.0, 0.0, -1.0]), -1)
    freq = torch.bincount(actions, minlength=3) / actions.numel()
    assert torch.allclose(freq, expected, atol=0.01)
    assert torch.allclose(logprobs, expected.log()[actions])
    assert values.shape == (40_000,)


def test_gaussian_samples_and_entropy() -> None:
    torch.manual_seed(0)
    agent = Agent(2, 2, continuous=True)
    with torch.no_grad():
        agent.log_std.copy_(torch.tensor([0.0, -1.0]))
        obs = torch.zeros(20_000, 2)
        actions, logprobs, _ = agent.act(obs)
    mean = agent.actor(obs[:1]).detach()
    assert torch.allclose(actions.std(0), torch.tensor([1.0, torch.e**-1]), rtol=0.03)
    assert torch.allclose(actions.mean(0), mean[0], atol=0.03)
    new_logprobs, entropy, _ = agent.evaluate(obs[:5], actions[:5])
    assert torch.allclose(new_logprobs, logprobs[:5], atol=1e-5)
    reference = torch.distributions.Normal(mean[0], agent.log_std.exp()).entropy().sum()
    assert torch.allclose(entropy, reference.expand(5), atol=1e-5)


def test_critic_free_agent_has_no_critic_parameters() -> None:
    agent = Agent(4, 2, continuous=False, with_critic=False)
    assert agent.critic is None
    assert torch.equal(agent.value(torch.randn(3, 4)), torch.zeros(3))
