import pytest

from posttrain.data.trace import Episode, Trace, single_turn_trace


def test_single_turn_trace_masks_the_prompt_and_aligns_logprobs():
    trace = single_turn_trace([5, 6, 7], [8, 9], [-0.5, -1.5], episode_id=3, group_id=1)
    assert trace.tokens == [5, 6, 7, 8, 9]
    assert trace.loss_mask == [0, 0, 0, 1, 1]
    assert trace.rollout_logprobs == [0.0, 0.0, 0.0, -0.5, -1.5]
    assert trace.num_actions == 2
    assert (trace.episode_id, trace.group_id, trace.segment_index, trace.ended) == (3, 1, 0, True)


def test_misaligned_trace_is_an_error_naming_the_lengths():
    with pytest.raises(ValueError, match="3 tokens, 2 loss_mask"):
        Trace(tokens=[1, 2, 3], loss_mask=[0, 1], rollout_logprobs=[0.0, 0.0, 0.0], episode_id=0, group_id=0)


def test_episode_ids_come_from_its_traces():
    traces = [single_turn_trace([1], [2], [-1.0], episode_id=7, group_id=2)]
    episode = Episode(traces=traces, reward=1.0)
    assert episode.episode_id == 7 and episode.group_id == 2
