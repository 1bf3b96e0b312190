import pytest
import torch

from posttrain.data.batch import collate_episodes, mini_batches
from posttrain.data.trace import Episode, Trace, single_turn_trace


def _two_segment_episode() -> Episode:
    # segment 0: prompt, 2 actions, tool output; segment 1: summary prompt, 1 action
    first = Trace(
        [1, 2, 3, 4],
        [0, 1, 1, 0],
        [0.0, -0.1, -0.2, 0.0],
        episode_id=5,
        group_id=0,
        segment_index=0,
        ended=False,
    )
    second = Trace([1, 9, 8], [0, 0, 1], [0.0, 0.0, -0.3], episode_id=5, group_id=0, segment_index=1)
    return Episode(traces=[second, first], reward=2.0)  # out of order on purpose


def test_collate_pads_right_and_places_reward_on_last_action_of_last_segment():
    single = Episode([single_turn_trace([1, 2], [3], [-0.7], episode_id=6, group_id=1)], reward=-1.0)
    batch = collate_episodes([_two_segment_episode(), single], pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4], [1, 9, 8, 0], [1, 2, 3, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]]
    assert batch.loss_mask.tolist() == [[0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 1, 0]]
    assert batch.token_rewards.tolist() == [[0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, -1.0, 0]]
    assert batch.segment_index.tolist() == [0, 1, 0]
    assert batch.episode_ids.tolist() == [5, 5, 6]
    assert batch.group_ids.tolist() == [0, 0, 1]
    assert batch.ended.tolist() == [False, True, True]
    torch.testing.assert_close(batch.rollout_logprobs[0], torch.tensor([0.0, -0.1, -0.2, 0.0]))


def test_select_trims_trailing_padding_and_keeps_optional_fields():
    single = Episode([single_turn_trace([1], [3], [-0.7], episode_id=6, group_id=1)], reward=1.0)
    batch = collate_episodes([_two_segment_episode(), single], pad_token_id=0)
    batch.values = torch.arange(12.0).reshape(3, 4)
    part = batch.select([2])
    assert part.input_ids.shape == (1, 2)
    assert part.values.tolist() == [[8.0, 9.0]]
    assert part.episode_ids.tolist() == [6]
    assert "values" in part.as_dict() and "advantages" not in part.as_dict()


def test_empty_batch_is_an_error():
    with pytest.raises(ValueError, match="zero traces"):
        collate_episodes([], pad_token_id=0)


def test_mini_batches_partition_the_rows():
    parts = mini_batches(10, 3, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert [len(p) for p in parts] == [4, 3, 3]
    with pytest.raises(ValueError, match="num_mini_batches"):
        mini_batches(2, 3, torch.Generator())
