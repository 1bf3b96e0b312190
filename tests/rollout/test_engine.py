import pytest

from posttrain.rollout.engine import Completion, RolloutEngine, SamplingParams


def test_defaults_sample_at_temperature_one_without_truncation() -> None:
    params = SamplingParams()
    assert (params.max_new_tokens, params.temperature, params.top_p, params.top_k) == (32, 1.0, 1.0, 0)
    assert params.stop_on_eos and not params.greedy
    assert params.logprob_temperature == 1.0


def test_temperature_zero_is_greedy_with_logprobs_at_temperature_one() -> None:
    greedy = SamplingParams(temperature=0.0)
    assert greedy.greedy and greedy.logprob_temperature == 1.0
    assert SamplingParams(temperature=0.6).logprob_temperature == 0.6


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_new_tokens", 0), ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1)],
)
def test_invalid_sampling_params_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


class EchoEngine:
    """Minimal engine: repeats the last prompt token; used to check the protocol is structural."""

    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, *, seed: int | None = None
    ) -> list[Completion]:
        return [
            Completion(list(p), [p[-1]] * params.max_new_tokens, [0.0] * params.max_new_tokens, "length", "")
            for p in prompt_ids
        ]

    def sync_weights(self, model: object) -> None:
        pass


def test_protocol_is_structural() -> None:
    assert isinstance(EchoEngine(), RolloutEngine)
    assert not isinstance(object(), RolloutEngine)
    (completion,) = EchoEngine().generate([[3, 4]], SamplingParams(max_new_tokens=2))
    assert completion.completion_ids == [4, 4] and completion.finish_reason == "length"
