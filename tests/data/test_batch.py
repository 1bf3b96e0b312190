import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from posttrain.data.batch import collate_episodes, micro_batches, mini_batches
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
    parts = mini_batches(torch.arange(10), 3, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert [len(p) for p in parts] == [4, 3, 3]
    with pytest.raises(ValueError, match="num_mini_batches"):
        mini_batches(torch.arange(2), 3, torch.Generator())


@given(
    segments=st.lists(st.integers(1, 4), min_size=1, max_size=12),
    num_mini_batches=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_mini_batches_never_split_an_episode(segments: list[int], num_mini_batches: int, seed: int):
    """Every sub-trace of an episode lands in the same mini-batch; episodes split near-evenly."""
    episode_ids = torch.tensor([10 * e for e, count in enumerate(segments) for _ in range(count)])
    episode_ids = episode_ids[torch.randperm(len(episode_ids), generator=torch.Generator().manual_seed(seed))]
    if num_mini_batches > len(segments):
        with pytest.raises(ValueError, match="episodes"):
            mini_batches(episode_ids, num_mini_batches, torch.Generator())
        return
    parts = mini_batches(episode_ids, num_mini_batches, torch.Generator().manual_seed(seed))
    assert len(parts) == num_mini_batches
    assert sorted(torch.cat(parts).tolist()) == list(range(len(episode_ids)))
    owner = {}
    for index, part in enumerate(parts):
        for episode in episode_ids[part].tolist():
            assert owner.setdefault(episode, index) == index
    episodes_per_part = [len(set(episode_ids[p].tolist())) for p in parts]
    assert max(episodes_per_part) - min(episodes_per_part) <= 1


def test_per_token_rewards_are_added_to_the_outcome():
    first = Trace(
        [1, 2, 3, 4],
        [0, 1, 0, 1],
        [0, -0.1, 0, -0.2],
        episode_id=0,
        group_id=0,
        ended=False,
        token_rewards=[0.0, 0.5, 0.0, -0.25],
    )
    second = Trace(
        [1, 5, 6],
        [0, 1, 1],
        [0, -0.3, -0.4],
        episode_id=0,
        group_id=0,
        segment_index=1,
        token_rewards=[0.0, 0.0, 2.0],
    )
    episode = Episode([first, second], reward=1.0)
    assert episode.total_reward == pytest.approx(1.0 + 0.5 - 0.25 + 2.0)
    assert episode.num_actions == 4
    batch = collate_episodes([episode], pad_token_id=0)
    assert batch.token_rewards.tolist() == [[0.0, 0.5, 0.0, -0.25], [0.0, 0.0, 3.0, 0.0]]


def test_micro_batches_group_rows_by_length_longest_first() -> None:
    lengths = [3, 7, 5, 7, 1]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    assert [m.tolist() for m in micro_batches(mask, 2)] == [[1, 3], [2, 0], [4]]
    # one micro-batch holding every row keeps their order
    assert [m.tolist() for m in micro_batches(mask, 5)] == [[0, 1, 2, 3, 4]]


@given(
    lengths=st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=20),
    size=st.integers(min_value=1, max_value=25),
)
def test_micro_batches_partition_the_rows_and_cut_padding(lengths: list[int], size: int) -> None:
    width = max(lengths)
    mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
    parts = micro_batches(mask, size)
    assert sorted(torch.cat(parts).tolist()) == list(range(len(lengths)))
    assert all(1 <= len(p) <= size for p in parts)
    assert len(parts) == -(-len(lengths) // size)
    # padded width summed over micro-batches never exceeds one batch padded to the longest row
    padded = sum(len(p) * max(lengths[i] for i in p.tolist()) for p in parts)
    assert padded <= len(lengths) * width


def test_weightless_rows_keep_their_tensors_and_weigh_nothing():
    batch = collate_episodes([_two_segment_episode()], pad_token_id=0)
    batch.loss_weights = torch.ones(2, 4)
    padding = batch.select([0]).weightless()
    assert padding.input_ids.tolist() == [[1, 2, 3, 4]]
    assert padding.loss_weights.tolist() == [[0.0] * 4]
    assert padding.value_weights is None  # unset stays unset
    assert batch.loss_weights.sum() == 8  # the original is untouched
