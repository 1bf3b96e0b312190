"""Conformance of every advantage estimator, policy loss and aggregation with multi-turn traces.

Multi-turn agent episodes put tool output and environment text into a row as tokens with
``loss_mask`` 0, and long episodes are compacted into several sub-traces: rows sharing
``episode_ids``, ordered by ``segment_index``. The suite iterates the registries (``ADVANTAGES``,
``POLICY_LOSSES``, ``AGGREGATIONS``), so a newly registered function is held to the same rules; the
only per-name knowledge is the short list of exceptions below, and a new loss or aggregation that
is not listed there must satisfy the invariant form. Losses run with default hyper-parameters.

1. Masked spans inserted inside a row (tool output: ``loss_mask`` 0, reward 0, any value, log-prob
   and old log-prob there, NaN and +-inf included).

   * Advantages: HOLD for every estimator. ``gae`` and ``reinforce_pp`` step gamma and lambda per
     trainable token, never per position, and read no value off the mask; group estimators read
     only rewards and (``opo``) trainable-token counts; every whitening (``gae`` with ``whiten``,
     ``reinforce_pp``, ``reinforce_pp_baseline``) runs over trainable tokens only.
   * Aggregated policy-loss gradient w.r.t. the trainable tokens' log-probs: HOLDS for every loss
     and aggregation, and the masked tokens' own gradient is exactly 0 (not NaN, even for a
     non-finite log-prob there, which would otherwise reach the model's parameters). The sequence
     ratios of ``gspo``, ``gspo_token`` and ``gmpo`` are means over trainable tokens, and every
     normaliser counts trainable tokens, rows with one, or episodes.
   * Exception forced by crediting: a masked token that carries a *reward* is not neutral. Its
     reward goes to the closest preceding trainable token of the episode (across sub-traces), so
     a masked token with reward r right after trainable token t gives exactly the advantages of
     adding r to t's reward. If no trainable token precedes it in the episode there is no action
     to credit: token-level estimators (``gae``, ``reinforce_pp``) drop it, while group
     estimators, which score an episode by the sum of all its rewards, still count it.
     Distillation (``reverse_kl``) reads no reward at all: its signal is the teacher's log-prob
     minus the student's on each trainable token, so a reward anywhere changes nothing.

2. An episode split at compaction points into 2 or 3 sub-traces (same ``episode_ids``,
   ``segment_index`` 0, 1, 2, rows in any order; later sub-traces may open with masked context
   tokens; the ``bootstrap_values`` of non-final sub-traces are ignored).

   * Advantages: HOLD for every estimator, given ``episode_ids`` and ``segment_index``. ``gae``
     with the same per-token values equals GAE over the episode's concatenated trainable tokens
     bootstrapped from the final sub-trace's value (checked against a hand-written loop); a
     critic that re-evaluates V on the compacted context legitimately changes it. Without
     ``episode_ids`` every sub-trace is scored as its own episode: NOT invariant (tested).
   * Aggregated gradient, token-level losses (all but the three below): HOLDS for ``token-mean``,
     ``token-sum`` and ``episode-mean`` (an episode cut into 3 sub-traces weighs like one unsplit
     episode; ``episode-mean`` needs ``episode_ids``). MUST NOT hold for the ``seq-mean-*``
     modes, which count rows. With N rows holding trainable tokens before the split and N'
     after, a token's weight is multiplied by N / N' (``seq-mean-token-sum``,
     ``seq-mean-token-sum-norm``) and by (n N) / (n_k N') for ``seq-mean-token-mean`` (n: the
     trainable tokens of the token's unsplit row, n_k: those of its sub-trace). Two episodes, one
     cut into three equal sub-traces: x1/2 on every token for the first two; x3/2 on the cut
     episode and x1/2 on the other for ``seq-mean-token-mean``.
   * Sequence-level losses ``gspo``, ``gspo_token``, ``gmpo``: the importance ratio is a geometric
     mean over a row, so every sub-trace k gets its own s_k = exp(mean of log r over its trainable
     tokens), with log s = sum_k (n_k / n) log s_k, and clipping is decided per sub-trace (with
     gspo's narrow default clip a sub-trace can be clipped, i.e. get no gradient, while the whole
     episode is not). On-policy (s = s_k = 1) the gradient obeys the token-level rule above when
     advantages are constant over an episode (group estimators), and for ``gspo_token``, which
     keeps per-token advantages, whatever the estimator. Off-policy, with the clip inactive (for
     ``gmpo``: token log-ratios inside its log-space clip), a token of sub-trace k has its
     gradient multiplied by s_k / s, times A_k / A for ``gspo`` and ``gmpo``, which weigh a row by
     its mean advantage A (A_k: the sub-trace's mean, which differs from the episode's for ``gae``
     and ``reinforce_pp``, so these two change even on-policy), times the aggregation's factor.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from posttrain.algorithms import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES
from posttrain.algorithms.aggregate import aggregate, token_weights

DTYPE = torch.float64
NAN, INF = math.nan, math.inf
RTOL, ATOL = 1e-9, 1e-10
CONSTANT = 8.0  # seq-mean-token-sum-norm's fixed normaliser

BATCH_FIELDS = (
    "token_rewards",
    "loss_mask",
    "values",
    "bootstrap_values",
    "group_ids",
    "episode_ids",
    "segment_index",
    "old_logprobs",
    "teacher_logprobs",
)
# Hyper-parameter settings checked besides the defaults (unlisted estimators run with defaults).
ESTIMATOR_HPARAMS: dict[str, list[dict[str, Any]]] = {
    "gae": [{"gamma": 0.9, "lam": 0.8}, {"gamma": 0.95, "lam": 0.7, "whiten": True}],
    "reinforce_pp": [{"gamma": 0.9}],
    "grpo": [{"scale": "batch"}, {"scale": "none"}],
    "grpo_passk": [{"scale": False}],
    "reverse_kl": [{"gamma": 0.9}],
}
ESTIMATOR_CASES: list[tuple[str, dict[str, Any]]] = [(name, {}) for name in ADVANTAGES.names()] + [
    (name, hparams) for name in ADVANTAGES.names() for hparams in ESTIMATOR_HPARAMS.get(name, [])
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in hp.items()) for name, hp in ESTIMATOR_CASES]

# Estimators that read no reward (on-policy distillation: the teacher's log-probs are the signal).
REWARD_FREE_ESTIMATORS = frozenset({"reverse_kl"})
# Losses whose ratio is a per-row geometric mean; every other loss must be token-level.
SEQUENCE_LEVEL_LOSSES = frozenset({"gspo", "gspo_token", "gmpo"})
ROW_MEAN_ADVANTAGE_LOSSES = frozenset({"gspo", "gmpo"})
CLIP_OFF = {"clip_low": 1e9, "clip_high": 1e9}
# Aggregations that count rows, with a row's per-token weight given (trainable tokens of the row,
# rows with a trainable token); every other aggregation must be invariant to splitting.
ROW_COUNTING_WEIGHT = {
    "seq-mean-token-mean": lambda n_row, n_seq: 1.0 / (n_row * n_seq),
    "seq-mean-token-sum": lambda n_row, n_seq: 1.0 / n_seq,
    "seq-mean-token-sum-norm": lambda n_row, n_seq: 1.0 / (n_seq * CONSTANT),
}


def estimator_params(name: str) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(ADVANTAGES.get(name)).parameters)


def is_token_level(name: str) -> bool:
    """Token-level estimators chain sub-traces (they take segment_index)."""
    return "segment_index" in estimator_params(name)


def is_group_estimator(name: str) -> bool:
    return "group_ids" in estimator_params(name)


# --------------------------------------------------------------------------------------------------
# A tiny trace model: episodes of tokens, laid out as rows (whole or split), rendered to tensors.
# Every trainable token of an episode carries a tag, so two layouts are compared token by token.
# --------------------------------------------------------------------------------------------------

Tag = tuple[int, int]


@dataclass(frozen=True)
class Tok:
    trainable: bool
    reward: float = 0.0
    value: float = 0.0
    logprob: float = 0.0
    old_logprob: float = 0.0
    tag: Tag | None = None
    teacher_logprob: float = 0.0


@dataclass(frozen=True)
class Episode:
    eid: int
    group: int
    tokens: tuple[Tok, ...]
    bootstrap: float


@dataclass(frozen=True)
class Row:
    eid: int
    group: int
    segment: int
    tokens: tuple[Tok, ...]
    bootstrap: float


@dataclass
class Batch:
    data: dict[str, Tensor]
    pos: dict[Tag, tuple[int, int]]  # trainable tagged token -> (row, column)


REWARDS = (-2.0, -1.0, -0.5, 0.0, 0.0, 0.0, 0.5, 1.0, 3.0)  # dyadic: exact sums in any order
GARBAGE = (0.0, 7.5, -1e4, 1e4, NAN, INF, -INF)
PAD = Tok(False, 0.0, NAN, -INF, -INF, teacher_logprob=-INF)


def filler(rng: random.Random, reward: float = 0.0) -> Tok:
    """A masked token (tool output, compacted context) with arbitrary value and log-probs (the
    teacher's is the policy's garbage)."""
    value, logprob, old_logprob = rng.choice(GARBAGE), rng.choice(GARBAGE), rng.choice(GARBAGE)
    return Tok(False, reward, value, logprob, old_logprob, teacher_logprob=logprob)


def action(tag: Tag, reward: float, value: float, logprob: float, log_ratio: float = 0.0) -> Tok:
    """A trainable token; a teacher would rate it -0.5 .. +0.5 nats off the old policy (by its tag)."""
    old_logprob = logprob - log_ratio
    teacher_offset = 0.25 * ((3 * tag[0] + tag[1]) % 5 - 2)
    return Tok(True, reward, value, logprob, old_logprob, tag, old_logprob + teacher_offset)


def random_episodes(rng: random.Random, max_episodes: int = 5, max_len: int = 9) -> list[Episode]:
    """Episodes in 1-3 groups; tokens trainable with probability 0.7, original environment tokens
    may carry a reward; log-ratios of trainable tokens in [-0.3, 0.3] (inside gmpo's clip)."""
    n_groups = rng.randint(1, 3)
    episodes = []
    for e in range(rng.randint(1, max_episodes)):
        eid = 10 * e + 3  # ids need not be dense
        tokens = []
        for i in range(rng.randint(1, max_len)):
            if rng.random() < 0.7:
                logprob = -rng.uniform(0.05, 3.0)
                tokens.append(
                    action((eid, i), rng.choice(REWARDS), rng.uniform(-2, 2), logprob, rng.uniform(-0.3, 0.3))
                )
            else:
                tokens.append(filler(rng, reward=rng.choice(REWARDS)))
        episodes.append(Episode(eid, rng.randrange(n_groups), tuple(tokens), rng.uniform(-1, 1)))
    return episodes


def whole(episodes: Sequence[Episode]) -> list[Row]:
    return [Row(ep.eid, ep.group, 0, ep.tokens, ep.bootstrap) for ep in episodes]


def split(
    episodes: Sequence[Episode], rng: random.Random, segments: int | None = None, max_context: int = 2
) -> list[Row]:
    """Cut each episode into ``segments`` (default: random 1-3) sub-traces at random points; later
    sub-traces open with 0..max_context masked context tokens; non-final bootstraps are junk."""
    rows = []
    for ep in episodes:
        n = len(ep.tokens)
        k = min(segments or rng.randint(1, 3), n)
        bounds = [0, *sorted(rng.sample(range(1, n), k - 1)), n]
        for s in range(k):
            context = tuple(filler(rng) for _ in range(rng.randint(0, max_context))) if s else ()
            bootstrap = ep.bootstrap if s == k - 1 else rng.uniform(100, 200)
            rows.append(Row(ep.eid, ep.group, s, context + ep.tokens[bounds[s] : bounds[s + 1]], bootstrap))
    rng.shuffle(rows)
    return rows


def with_masked_spans(rows: Sequence[Row], rng: random.Random, max_spans: int = 2) -> list[Row]:
    """Insert 0..max_spans spans of 1-3 reward-free masked tokens anywhere in each row."""
    out = []
    for row in rows:
        tokens = list(row.tokens)
        for _ in range(rng.randint(0, max_spans)):
            at = rng.randint(0, len(tokens))
            tokens[at:at] = [filler(rng) for _ in range(rng.randint(1, 3))]
        out.append(replace(row, tokens=tuple(tokens)))
    return out


def render(rows: Sequence[Row], pad: int = 1) -> Batch:
    """Rows -> batch tensors, right-padded with masked junk; float64 throughout."""
    time = max(len(row.tokens) for row in rows) + pad
    fields: dict[str, list[list[float]]] = {k: [] for k in ("r", "m", "v", "lp", "old", "teacher")}
    pos: dict[Tag, tuple[int, int]] = {}
    for b, row in enumerate(rows):
        tokens = list(row.tokens) + [PAD] * (time - len(row.tokens))
        for c, tok in enumerate(tokens):
            if tok.trainable and tok.tag is not None:
                pos[tok.tag] = (b, c)
        fields["r"].append([tok.reward for tok in tokens])
        fields["m"].append([float(tok.trainable) for tok in tokens])
        fields["v"].append([tok.value for tok in tokens])
        fields["lp"].append([tok.logprob for tok in tokens])
        fields["old"].append([tok.old_logprob for tok in tokens])
        fields["teacher"].append([tok.teacher_logprob for tok in tokens])

    def f(key: str) -> Tensor:
        return torch.tensor(fields[key], dtype=DTYPE)

    def i(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long)

    data = {
        "token_rewards": f("r"),
        "loss_mask": f("m"),
        "values": f("v"),
        "bootstrap_values": torch.tensor([row.bootstrap for row in rows], dtype=DTYPE),
        "group_ids": i([row.group for row in rows]),
        "episode_ids": i([row.eid for row in rows]),
        "segment_index": i([row.segment for row in rows]),
        "logprobs": f("lp"),
        "old_logprobs": f("old"),
        "teacher_logprobs": f("teacher"),
    }
    return Batch(data, pos)


# --------------------------------------------------------------------------------------------------
# The pipeline under test, and comparisons of two layouts token by token.
# --------------------------------------------------------------------------------------------------


def advantages_of(case: tuple[str, dict[str, Any]], batch: Batch) -> Tensor:
    name, hparams = case
    advantages, returns = ADVANTAGES.call(name, batch.data, hparams)
    off = batch.data["loss_mask"] == 0
    assert bool((advantages[off] == 0).all()) and bool((returns[off] == 0).all()), name
    return advantages


def policy_gradient(
    batch: Batch,
    advantages: Tensor,
    loss: str,
    aggregation: str,
    hparams: dict[str, Any] | None = None,
    on_policy: bool = False,
) -> Tensor:
    """d aggregate(loss) / d logprobs; the masked tokens' gradient must be exactly 0."""
    data = batch.data
    logprobs = data["logprobs"].clone().requires_grad_(True)
    old = data["logprobs"].clone() if on_policy else data["old_logprobs"]
    inputs = {"logprobs": logprobs, "old_logprobs": old, "advantages": advantages}
    per_token, _ = POLICY_LOSSES.call(loss, {**inputs, "loss_mask": data["loss_mask"]}, hparams)
    weights = token_weights(
        data["loss_mask"], aggregation, episode_ids=data["episode_ids"], constant=CONSTANT
    )
    (grad,) = torch.autograd.grad(aggregate(per_token, weights), logprobs)
    assert bool((grad[data["loss_mask"] == 0] == 0).all()), (loss, aggregation, grad)
    return grad


def on_tags(x: Tensor, batch: Batch, tags: Sequence[Tag]) -> Tensor:
    return torch.stack([x[batch.pos[tag]] for tag in tags]) if tags else x.new_zeros(0)


def common_tags(a: Batch, b: Batch) -> list[Tag]:
    assert sorted(a.pos) == sorted(b.pos)
    return sorted(a.pos)


def assert_same_tokens(x_a: Tensor, a: Batch, x_b: Tensor, b: Batch, factor: Tensor | None = None) -> None:
    """x_b == x_a * factor on every trainable token, matched by tag across the two layouts."""
    tags = common_tags(a, b)
    expected = on_tags(x_a, a, tags) * (1.0 if factor is None else factor)
    torch.testing.assert_close(on_tags(x_b, b, tags), expected, rtol=RTOL, atol=ATOL)


def weight_factor(aggregation: str, a: Batch, b: Batch) -> Tensor:
    """Per token (in tag order): its aggregation weight in layout b over its weight in layout a."""
    tags = common_tags(a, b)
    if aggregation not in ROW_COUNTING_WEIGHT:
        return torch.ones(len(tags), dtype=DTYPE)
    weight = ROW_COUNTING_WEIGHT[aggregation]
    n_a, n_b = a.data["loss_mask"].sum(1), b.data["loss_mask"].sum(1)
    seq_a, seq_b = float((n_a > 0).sum()), float((n_b > 0).sum())
    return torch.tensor(
        [weight(float(n_b[b.pos[t][0]]), seq_b) / weight(float(n_a[a.pos[t][0]]), seq_a) for t in tags],
        dtype=DTYPE,
    )


def row_stats(batch: Batch, advantages: Tensor, tags: Sequence[Tag]) -> tuple[Tensor, Tensor]:
    """For each tag, over the trainable tokens of its row: s = exp(mean log ratio), mean advantage."""
    data = batch.data
    ratios, means = [], []
    for tag in tags:
        b = batch.pos[tag][0]
        cols = [c for c in range(data["loss_mask"].shape[1]) if data["loss_mask"][b, c] > 0]
        log_ratio = sum(float(data["logprobs"][b, c] - data["old_logprobs"][b, c]) for c in cols)
        ratios.append(math.exp(log_ratio / len(cols)))
        means.append(sum(float(advantages[b, c]) for c in cols) / len(cols))
    return torch.tensor(ratios, dtype=DTYPE), torch.tensor(means, dtype=DTYPE)


def reference_gae(tokens: Sequence[Tok], bootstrap: float, gamma: float, lam: float) -> dict[Tag, float]:
    """Hand-written GAE over an episode's tokens in order: only trainable tokens are steps, and a
    reward on a masked token is added to the step before it (dropped if there is none)."""
    steps: list[list[Any]] = []  # [tag, value, credited reward]
    for tok in tokens:
        if tok.trainable:
            steps.append([tok.tag, tok.value, 0.0])
        if steps:
            steps[-1][2] += tok.reward
    advantages: dict[Tag, float] = {}
    next_value, running = bootstrap, 0.0
    for tag, value, reward in reversed(steps):
        running = reward + gamma * next_value - value + gamma * lam * running
        advantages[tag] = running
        next_value = value
    return advantages


def seeded(seed: int) -> random.Random:
    return random.Random(seed)


# --------------------------------------------------------------------------------------------------
# Coverage: the registries and this suite's classifications agree
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_every_estimator_gets_the_batch_fields_it_needs(name: str) -> None:
    for param in estimator_params(name).values():
        if param.default is inspect.Parameter.empty:
            assert param.name in BATCH_FIELDS, f"{name} needs {param.name!r}: add it to the suite"
    # Exactly one family, so the reward-crediting exception below knows what to expect.
    assert is_token_level(name) != is_group_estimator(name), name


def test_listed_exceptions_name_registered_functions() -> None:
    assert set(ESTIMATOR_HPARAMS) <= set(ADVANTAGES.names())
    assert set(SEQUENCE_LEVEL_LOSSES) <= set(POLICY_LOSSES.names())
    assert set(ROW_COUNTING_WEIGHT) <= set(AGGREGATIONS.names())
    assert {"token-mean", "token-sum", "episode-mean"} <= set(AGGREGATIONS.names())


# --------------------------------------------------------------------------------------------------
# 1. Masked spans inside a row
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ESTIMATOR_CASES, ids=CASE_IDS)
def test_masked_spans_keep_every_advantage(case: tuple[str, dict[str, Any]]) -> None:
    nonzero = 0
    for seed in range(6):
        rng = seeded(seed)
        base = split(random_episodes(rng), rng)
        a, b = render(base), render(with_masked_spans(base, rng, max_spans=3))
        adv_a = advantages_of(case, a)
        assert_same_tokens(adv_a, a, advantages_of(case, b), b)
        nonzero += int(bool((adv_a != 0).any()))
    assert nonzero >= 3  # the data exercises the estimator


@pytest.mark.parametrize("aggregation", AGGREGATIONS.names())
@pytest.mark.parametrize("loss", POLICY_LOSSES.names())
def test_masked_spans_keep_the_policy_gradient(loss: str, aggregation: str) -> None:
    for seed in range(2):
        rng = seeded(100 + seed)
        base = split(random_episodes(rng), rng)
        a, b = render(base), render(with_masked_spans(base, rng, max_spans=3))
        for case in ESTIMATOR_CASES:
            grad_a = policy_gradient(a, advantages_of(case, a), loss, aggregation)
            grad_b = policy_gradient(b, advantages_of(case, b), loss, aggregation)
            assert_same_tokens(grad_a, a, grad_b, b)


@pytest.mark.parametrize("loss", POLICY_LOSSES.names())
@pytest.mark.parametrize(
    ("logprob", "old_logprob"), [(-INF, -3.0), (-INF, -INF), (-3.0, NAN), (NAN, NAN), (INF, -INF)]
)
def test_non_finite_logprobs_off_the_mask_get_zero_gradient(
    loss: str, logprob: float, old_logprob: float
) -> None:
    """A masked position may hold anything (a vocabulary-masked tool token has log-prob -inf); its
    gradient must be exactly 0, since a NaN there reaches the model's parameters through backward."""
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=DTYPE)
    advantages = torch.tensor([[1.0, 0.0, -0.5, 1.0]], dtype=DTYPE)
    old = torch.tensor([[-1.1, old_logprob, -0.4, -2.0]], dtype=DTYPE)
    clean_old = torch.where(mask > 0, old, 0.0)
    settings_to_try: list[dict[str, Any]] = [{}]
    if loss == "reinforce":
        settings_to_try.append({"is_clip": 1.05})
    if loss == "ppo_clip":
        settings_to_try.append({"dual_clip": 3.0})
    for hparams in settings_to_try:
        grads = []
        for masked_logprob, old_logprobs in ((logprob, old), (0.0, clean_old)):
            logprobs = torch.tensor([[-1.0, masked_logprob, -0.5, -2.2]], dtype=DTYPE, requires_grad=True)
            data = {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages}
            per_token, metrics = POLICY_LOSSES.call(loss, {**data, "loss_mask": mask}, hparams)
            assert bool(torch.isfinite(per_token).all()), hparams
            assert all(bool(torch.isfinite(v)) for v in metrics.values()), hparams
            (grad,) = torch.autograd.grad(aggregate(per_token, token_weights(mask, "token-mean")), logprobs)
            grads.append(grad)
        assert grads[0][0, 1] == 0, (hparams, grads[0])
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("case", ESTIMATOR_CASES, ids=CASE_IDS)
def test_reward_on_a_masked_token_is_credited_to_the_preceding_action(
    case: tuple[str, dict[str, Any]],
) -> None:
    """The exception to 1: a masked token carrying reward r right after trainable token t (possibly
    the last of an earlier sub-trace) gives the advantages of adding r to t's own reward (for an
    estimator that reads rewards at all)."""
    changed = 0
    for seed in range(4):
        rng = seeded(200 + seed)
        rows = split(random_episodes(rng), rng)
        b, c = next((b, c) for b, row in enumerate(rows) for c, tok in enumerate(row.tokens) if tok.trainable)
        tokens = list(rows[b].tokens)
        on_masked, on_action = list(rows), list(rows)
        on_masked[b] = replace(rows[b], tokens=(*tokens[: c + 1], filler(rng, reward=1.5), *tokens[c + 1 :]))
        tokens[c] = replace(tokens[c], reward=tokens[c].reward + 1.5)
        on_action[b] = replace(rows[b], tokens=tuple(tokens))
        x, y, base = render(on_masked), render(on_action), render(rows)
        adv_y = advantages_of(case, y)
        assert_same_tokens(adv_y, y, advantages_of(case, x), x)
        tags = common_tags(base, y)
        changed += int(
            not torch.allclose(on_tags(adv_y, y, tags), on_tags(advantages_of(case, base), base, tags))
        )
    if case[0] in REWARD_FREE_ESTIMATORS:
        assert changed == 0  # no reward is read: the teacher's signal alone
    else:
        assert changed >= 1  # the moved reward matters, so the check can fail


@pytest.mark.parametrize("case", ESTIMATOR_CASES, ids=CASE_IDS)
def test_reward_on_a_masked_token_before_any_action(case: tuple[str, dict[str, Any]]) -> None:
    """No trainable token precedes it in its episode: token-level estimators drop the reward (no
    action to credit), group estimators add it to the episode's score."""
    name = case[0]
    rng = seeded(300)
    # Episode 3: sub-trace 0 is a tool call result only, sub-trace 1 holds the actions.
    ep3 = [
        Row(3, 0, 0, (filler(rng), filler(rng)), 50.0),
        Row(3, 0, 1, (action((3, 0), 0.0, 0.2, -1.0, 0.1), filler(rng), action((3, 1), 1.0, 0.4, -0.5)), 0.0),
    ]
    ep4 = [Row(4, 0, 0, (action((4, 0), 0.0, -0.3, -0.7), action((4, 1), 0.5, 0.1, -0.2, -0.1)), 0.0)]
    ep5 = [Row(5, 0, 0, (action((5, 0), 2.0, 0.0, -0.3),), 0.0)]
    base = ep3 + ep4 + ep5
    prefixed = [replace(base[0], tokens=(filler(rng, reward=-2.5), *base[0].tokens)), *base[1:]]
    on_first_action = [
        base[0],
        replace(base[1], tokens=(replace(base[1].tokens[0], reward=-2.5), *base[1].tokens[1:])),
        *base[2:],
    ]
    a, b, c = render(base), render(prefixed), render(on_first_action)
    adv_b = advantages_of(case, b)
    if is_token_level(name):
        assert_same_tokens(advantages_of(case, a), a, adv_b, b)
    else:
        assert_same_tokens(advantages_of(case, c), c, adv_b, b)
        assert not torch.equal(
            on_tags(adv_b, b, sorted(b.pos)), on_tags(advantages_of(case, a), a, sorted(a.pos))
        )


# --------------------------------------------------------------------------------------------------
# 2. Splitting an episode at compaction points
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("segments", [2, 3])
@pytest.mark.parametrize("case", ESTIMATOR_CASES, ids=CASE_IDS)
def test_split_keeps_every_advantage(case: tuple[str, dict[str, Any]], segments: int) -> None:
    nonzero = 0
    for seed in range(6):
        rng = seeded(400 + seed)
        episodes = random_episodes(rng, max_len=10)
        a, b = render(whole(episodes)), render(split(episodes, rng, segments=segments))
        adv_a = advantages_of(case, a)
        assert_same_tokens(adv_a, a, advantages_of(case, b), b)
        nonzero += int(bool((adv_a != 0).any()))
    assert nonzero >= 3


def outcome_episode(eid: int, group: int, outcome: float, n: int, rng: random.Random) -> Episode:
    """n actions with tool output between some of them; the outcome on the last action."""
    tokens: list[Tok] = []
    for i in range(n):
        tokens.append(
            action((eid, i), outcome if i == n - 1 else 0.0, rng.uniform(-1, 1), -rng.uniform(0.1, 2))
        )
        if i % 3 == 1:
            tokens.append(filler(rng))
    return Episode(eid, group, tuple(tokens), 0.0)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.9, 0.8), (0.5, 0.0), (0.99, 0.95)])
def test_split_gae_equals_hand_written_gae_over_the_concatenation(gamma: float, lam: float) -> None:
    rng = seeded(500)
    episodes = [outcome_episode(1, 0, 1.0, 7, rng), outcome_episode(2, 0, 0.0, 5, rng)]
    episodes[1] = replace(episodes[1], bootstrap=0.75)  # truncated episode: bootstraps from V
    episodes += random_episodes(rng, max_len=10)  # rewards anywhere, on masked tokens too
    for segments in (2, 3):
        batch = render(split(episodes, rng, segments=segments))
        advantages, returns = ADVANTAGES.call("gae", batch.data, {"gamma": gamma, "lam": lam})
        _, rtg = ADVANTAGES.call("reinforce_pp", batch.data, {"gamma": gamma})
        for ep in episodes:
            expected = reference_gae(ep.tokens, ep.bootstrap, gamma, lam)
            zero_values = [replace(tok, value=0.0) for tok in ep.tokens]
            expected_rtg = reference_gae(zero_values, 0.0, gamma, 1.0)
            for tag, value in expected.items():
                where = batch.pos[tag]
                token_value = next(tok.value for tok in ep.tokens if tok.tag == tag)
                assert float(advantages[where]) == pytest.approx(value, rel=1e-9, abs=1e-10)
                assert float(returns[where]) == pytest.approx(value + token_value, rel=1e-9, abs=1e-10)
                assert float(rtg[where]) == pytest.approx(expected_rtg[tag], rel=1e-9, abs=1e-10)


@pytest.mark.parametrize("case", ESTIMATOR_CASES, ids=CASE_IDS)
def test_split_without_episode_ids_is_not_invariant(case: tuple[str, dict[str, Any]]) -> None:
    """Must NOT hold: without episode_ids each sub-trace is its own episode, so the first sub-trace
    no longer sees the outcome reward (nor, for gae, the next sub-trace's value, nor, for a
    discounted reverse_kl, the teacher's verdict on the next sub-trace). Undiscounted reverse_kl is
    per token: it needs nothing from another token, so it holds there."""
    rng = seeded(600)
    episodes = [
        outcome_episode(1, 0, 1.0, 6, rng),
        outcome_episode(2, 0, 0.0, 4, rng),
        outcome_episode(3, 0, 0.5, 5, rng),
    ]
    whole_batch = render(whole(episodes))
    rows = split(episodes[:1], rng, segments=2, max_context=0) + whole(episodes[1:])
    rows = [replace(row, bootstrap=0.0) for row in rows]
    cut = render(rows)
    cut.data["episode_ids"] = torch.arange(len(rows))  # ids dropped: every row its own episode
    cut.data["segment_index"] = torch.zeros(len(rows), dtype=torch.long)
    first = sorted(
        tag
        for tag in cut.pos
        if cut.pos[tag][0] == next(i for i, r in enumerate(rows) if r.eid == 1 and r.segment == 0)
    )
    chained = on_tags(advantages_of(case, whole_batch), whole_batch, first)
    unchained = on_tags(advantages_of(case, cut), cut, first)
    if case[0] == "reverse_kl" and not case[1].get("gamma"):
        torch.testing.assert_close(chained, unchained, rtol=0, atol=0)
    else:
        assert not torch.allclose(chained, unchained, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("aggregation", AGGREGATIONS.names())
@pytest.mark.parametrize("loss", sorted(set(POLICY_LOSSES.names()) - SEQUENCE_LEVEL_LOSSES))
def test_split_gradient_of_token_level_losses(loss: str, aggregation: str) -> None:
    """Invariant, except for the row-counting seq-mean-* modes: exact per-token weight factor."""
    for seed in range(2):
        rng = seeded(700 + seed)
        episodes = random_episodes(rng, max_len=10)
        a, b = render(whole(episodes)), render(split(episodes, rng))
        factor = weight_factor(aggregation, a, b)
        for case in ESTIMATOR_CASES:
            grad_a = policy_gradient(a, advantages_of(case, a), loss, aggregation)
            grad_b = policy_gradient(b, advantages_of(case, b), loss, aggregation)
            assert_same_tokens(grad_a, a, grad_b, b, factor)


def two_episode_batches() -> tuple[Batch, Batch]:
    """Episode 1 (6 actions, outcome 1) whole / cut into 3 sub-traces of 2; episode 2 (4 actions)."""
    rng = seeded(800)
    ep1 = outcome_episode(1, 0, 1.0, 6, rng)
    ep1 = replace(ep1, tokens=tuple(tok for tok in ep1.tokens if tok.trainable))
    ep2 = outcome_episode(2, 0, 0.0, 4, rng)
    pieces = [Row(1, 0, s, (filler(rng), *ep1.tokens[2 * s : 2 * s + 2]), 9.0) for s in range(3)]
    off_policy = [
        replace(tok, old_logprob=tok.logprob - 0.05 * (i % 3 - 1)) for i, tok in enumerate(ep2.tokens)
    ]
    ep2 = replace(ep2, tokens=tuple(off_policy))
    return render(whole([ep1, ep2])), render([pieces[2], *whole([ep2]), pieces[0], pieces[1]])


def test_row_counting_aggregations_change_by_the_expected_factor() -> None:
    a, b = two_episode_batches()
    tags = common_tags(a, b)
    cut = torch.tensor([tag[0] == 1 for tag in tags])
    expected = {
        "token-mean": torch.ones(len(tags)),
        "token-sum": torch.ones(len(tags)),
        "episode-mean": torch.ones(len(tags)),
        "seq-mean-token-sum": torch.full((len(tags),), 0.5),  # 2 rows -> 4 rows
        "seq-mean-token-sum-norm": torch.full((len(tags),), 0.5),
        "seq-mean-token-mean": torch.where(cut, 1.5, 0.5),  # (6 * 2) / (2 * 4) and (4 * 2) / (4 * 4)
    }
    assert set(expected) <= set(AGGREGATIONS.names())
    for aggregation, factor in expected.items():
        torch.testing.assert_close(weight_factor(aggregation, a, b), factor.to(DTYPE))
        for loss in sorted(set(POLICY_LOSSES.names()) - SEQUENCE_LEVEL_LOSSES):
            advantages_a, advantages_b = advantages_of(("grpo", {}), a), advantages_of(("grpo", {}), b)
            grad_a = policy_gradient(a, advantages_a, loss, aggregation)
            grad_b = policy_gradient(b, advantages_b, loss, aggregation)
            assert bool((on_tags(grad_a, a, tags) != 0).all())
            assert_same_tokens(grad_a, a, grad_b, b, factor.to(DTYPE))


def loss_inputs(batch: Batch, advantages: Tensor) -> dict[str, Tensor]:
    data = batch.data
    return {
        "logprobs": data["logprobs"],
        "old_logprobs": data["old_logprobs"],
        "advantages": advantages,
        "loss_mask": data["loss_mask"],
    }


def test_split_sequence_ratio_is_per_subtrace_geometric_mean() -> None:
    """gspo's per-token loss is -s A (clip off): s_k per sub-trace, log s = sum_k n_k / n log s_k."""
    rng = seeded(900)
    episodes = random_episodes(rng, max_len=10)
    a, b = render(whole(episodes)), render(split(episodes, rng, segments=3))
    tags = common_tags(a, b)
    ones_a = a.data["loss_mask"].clone()
    ones_b = b.data["loss_mask"].clone()
    loss_a, _ = POLICY_LOSSES.call("gspo", loss_inputs(a, ones_a), CLIP_OFF)
    loss_b, _ = POLICY_LOSSES.call("gspo", loss_inputs(b, ones_b), CLIP_OFF)
    s_whole, s_pieces = -on_tags(loss_a, a, tags), -on_tags(loss_b, b, tags)
    torch.testing.assert_close(s_whole, row_stats(a, ones_a, tags)[0])
    torch.testing.assert_close(s_pieces, row_stats(b, ones_b, tags)[0])
    for ep in episodes:
        mine = [i for i, tag in enumerate(tags) if tag[0] == ep.eid]
        if mine:
            # mean over the episode's tokens of log s_k (each sub-trace counted n_k times) == log s
            torch.testing.assert_close(torch.log(s_pieces[mine]).mean(), torch.log(s_whole[mine[0]]))
    assert not torch.allclose(s_whole, s_pieces)


@pytest.mark.parametrize("aggregation", AGGREGATIONS.names())
@pytest.mark.parametrize("loss", sorted(SEQUENCE_LEVEL_LOSSES))
def test_split_gradient_of_sequence_level_losses(loss: str, aggregation: str) -> None:
    """On-policy: the token-level rule holds with episode-constant advantages (and for gspo_token
    with any). Off-policy, clip off: factor (s_k / s) (A_k / A), A = 1 for gspo_token."""
    for seed in range(2):
        rng = seeded(1000 + seed)
        episodes = random_episodes(rng, max_len=10)
        a, b = render(whole(episodes)), render(split(episodes, rng))
        tags = common_tags(a, b)
        factor = weight_factor(aggregation, a, b)
        for case in ESTIMATOR_CASES:
            adv_a, adv_b = advantages_of(case, a), advantages_of(case, b)
            check_sequence_level_split(a, b, tags, case, adv_a, adv_b, loss, aggregation, factor)


def check_sequence_level_split(
    a: Batch,
    b: Batch,
    tags: list[Tag],
    case: tuple[str, dict[str, Any]],
    adv_a: Tensor,
    adv_b: Tensor,
    loss: str,
    aggregation: str,
    factor: Tensor,
) -> None:
    """The split rule for a sequence-level loss: on-policy the token-level rule (episode-constant
    advantages, or gspo_token); off-policy, clip off, the gradient scales by
    factor * (s_k / s) * (A_k / A) (A = 1 unless the loss weighs a row by its mean advantage)."""
    if is_group_estimator(case[0]) or loss not in ROW_MEAN_ADVANTAGE_LOSSES:
        grad_a = policy_gradient(a, adv_a, loss, aggregation, on_policy=True)
        grad_b = policy_gradient(b, adv_b, loss, aggregation, on_policy=True)
        assert_same_tokens(grad_a, a, grad_b, b, factor)
    grad_a = policy_gradient(a, adv_a, loss, aggregation, CLIP_OFF)
    grad_b = policy_gradient(b, adv_b, loss, aggregation, CLIP_OFF)
    s_a, mean_a = row_stats(a, adv_a, tags)
    s_b, mean_b = row_stats(b, adv_b, tags)
    if loss not in ROW_MEAN_ADVANTAGE_LOSSES:
        mean_a = mean_b = torch.ones_like(mean_a)
    # cross-multiplied: grad_b / grad_a == factor * (s_b mean_b) / (s_a mean_a)
    lhs = on_tags(grad_b, b, tags) * s_a * mean_a
    rhs = on_tags(grad_a, a, tags) * factor * s_b * mean_b
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-10)


def test_gspo_gmpo_with_token_varying_advantages_change_even_on_policy() -> None:
    """gspo/gmpo weigh a row by its mean advantage: on-policy, token t of sub-trace k gets
    -w_t * mean_k(A) instead of -w_t * mean(A) (token-sum: w = 1); gspo_token keeps -w_t * A_t."""
    rng = seeded(1100)
    episodes = [outcome_episode(1, 0, 1.0, 6, rng)]
    a, b = render(whole(episodes)), render(split(episodes, rng, segments=3))
    tags = common_tags(a, b)
    case = ("gae", {"gamma": 0.9, "lam": 0.8})
    adv_a, adv_b = advantages_of(case, a), advantages_of(case, b)
    for loss in ROW_MEAN_ADVANTAGE_LOSSES:
        grad_b = policy_gradient(b, adv_b, loss, "token-sum", on_policy=True)
        grad_a = policy_gradient(a, adv_a, loss, "token-sum", on_policy=True)
        torch.testing.assert_close(on_tags(grad_b, b, tags), -row_stats(b, adv_b, tags)[1])
        torch.testing.assert_close(on_tags(grad_a, a, tags), -row_stats(a, adv_a, tags)[1])
        assert not torch.allclose(on_tags(grad_a, a, tags), on_tags(grad_b, b, tags))
    grad_b = policy_gradient(b, adv_b, "gspo_token", "token-sum", on_policy=True)
    torch.testing.assert_close(on_tags(grad_b, b, tags), -on_tags(adv_b, b, tags))


def test_gspo_default_clip_is_decided_per_subtrace() -> None:
    """Log ratios (+0.1, +0.1 | -0.1, -0.1): the whole episode has s = 1 (inside gspo's default clip
    1 +- 4e-4); cut in two, sub-trace 0 has s_0 = e^0.1 (clipped: no gradient) and sub-trace 1
    s_1 = e^-0.1 (gradient -s_1 A). gmpo (log-space clip 0.4 per token) scales by e^+-0.1."""
    ep1 = Episode(
        1,
        0,
        tuple(
            action((1, i), float(i == 3), 0.0, -1.0 - i / 10, r) for i, r in enumerate((0.1, 0.1, -0.1, -0.1))
        ),
        0.0,
    )
    ep2 = Episode(2, 0, (action((2, 0), 0.0, 0.0, -0.5),), 0.0)
    rng = seeded(1200)
    pieces = [Row(1, 0, s, (filler(rng), *ep1.tokens[2 * s : 2 * s + 2]), 0.0) for s in range(2)]
    a, b = render(whole([ep1, ep2])), render([*pieces, *whole([ep2])])
    tags = [(1, i) for i in range(4)]
    adv_a = advantages_of(("grpo", {}), a)
    advantage = float(adv_a[a.pos[(1, 0)]])
    assert advantage > 0
    expected_whole = torch.full((4,), -advantage, dtype=DTYPE)
    for loss in ("gspo", "gspo_token"):
        grad_a = policy_gradient(a, adv_a, loss, "token-sum")
        grad_b = policy_gradient(b, advantages_of(("grpo", {}), b), loss, "token-sum")
        torch.testing.assert_close(on_tags(grad_a, a, tags), expected_whole)
        expected = torch.tensor([0.0, 0.0, -math.exp(-0.1), -math.exp(-0.1)], dtype=DTYPE) * advantage
        torch.testing.assert_close(on_tags(grad_b, b, tags), expected)
    grad_a = policy_gradient(a, adv_a, "gmpo", "token-sum")
    grad_b = policy_gradient(b, advantages_of(("grpo", {}), b), "gmpo", "token-sum")
    scale = torch.tensor([math.exp(0.1)] * 2 + [math.exp(-0.1)] * 2, dtype=DTYPE)
    torch.testing.assert_close(on_tags(grad_b, b, tags), on_tags(grad_a, a, tags) * scale)


# --------------------------------------------------------------------------------------------------
# 3. Property tests: random lengths, masks, split points, rewards, values; several episodes/groups
# --------------------------------------------------------------------------------------------------

PROPERTY = settings(max_examples=30, deadline=None)


@PROPERTY
@given(rng=st.randoms(use_true_random=False), case=st.sampled_from(ESTIMATOR_CASES))
def test_property_masked_spans_keep_advantages_and_gradients(
    rng: random.Random, case: tuple[str, dict[str, Any]]
) -> None:
    base = split(random_episodes(rng), rng)
    a, b = render(base, pad=rng.randint(0, 2)), render(with_masked_spans(base, rng, max_spans=3))
    adv_a, adv_b = advantages_of(case, a), advantages_of(case, b)
    assert_same_tokens(adv_a, a, adv_b, b)
    for loss in POLICY_LOSSES.names():
        for aggregation in AGGREGATIONS.names():
            grad_a = policy_gradient(a, adv_a, loss, aggregation)
            assert_same_tokens(grad_a, a, policy_gradient(b, adv_b, loss, aggregation), b)


@PROPERTY
@given(
    rng=st.randoms(use_true_random=False),
    case=st.sampled_from(ESTIMATOR_CASES),
    gamma=st.sampled_from([1.0, 0.9, 0.5]),
    lam=st.sampled_from([1.0, 0.8, 0.0]),
)
def test_property_split_keeps_advantages_and_scales_gradients(
    rng: random.Random, case: tuple[str, dict[str, Any]], gamma: float, lam: float
) -> None:
    episodes = random_episodes(rng, max_len=10)
    a, b = render(whole(episodes)), render(split(episodes, rng))
    tags = common_tags(a, b)
    adv_a, adv_b = advantages_of(case, a), advantages_of(case, b)
    assert_same_tokens(adv_a, a, adv_b, b)

    gae_b, _ = ADVANTAGES.call("gae", b.data, {"gamma": gamma, "lam": lam})
    expected: dict[Tag, float] = {}
    for ep in episodes:
        expected.update(reference_gae(ep.tokens, ep.bootstrap, gamma, lam))
    torch.testing.assert_close(
        on_tags(gae_b, b, tags), torch.tensor([expected[t] for t in tags], dtype=DTYPE), rtol=RTOL, atol=ATOL
    )

    for aggregation in AGGREGATIONS.names():
        factor = weight_factor(aggregation, a, b)
        for loss in POLICY_LOSSES.names():
            if loss in SEQUENCE_LEVEL_LOSSES:
                check_sequence_level_split(a, b, tags, case, adv_a, adv_b, loss, aggregation, factor)
                continue
            grad_a = policy_gradient(a, adv_a, loss, aggregation)
            assert_same_tokens(grad_a, a, policy_gradient(b, adv_b, loss, aggregation), b, factor)
