"""Answers chat requests: checks them against the context, routes them to an adapter, streams the
engine's output, and logs each exchange (without waiting for the disk)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from .domain import BASE_VERSION, Completion, GenerationRequest
from .engine import Chunk, Engine
from .errors import InvalidRequest
from .metrics import Metrics
from .router import AdapterRouter
from .store import Store


class Inference:
    """The generation use case, independent of gRPC."""

    def __init__(self, engine: Engine, router: AdapterRouter, store: Store, metrics: Metrics,
                 default_max_tokens: int) -> None:
        self._engine, self._router, self._store, self._metrics = engine, router, store, metrics
        self._default_max_tokens = default_max_tokens

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str | Completion]:
        """Yields text deltas, then the Completion. Also logs it when the caller stops early."""
        started = time.perf_counter()
        prompt_ids = self._engine.render(request.messages)
        max_tokens = self._max_tokens(request, len(prompt_ids))
        adapter = await self._router.route(request.adapter)
        done = Completion(uuid.uuid4().hex, "", "abort", len(prompt_ids), 0,
                          adapter.version if adapter else BASE_VERSION)
        parts: list[str] = []
        try:
            with self._router.serving(adapter):
                chunk: Chunk
                async for chunk in self._engine.stream(prompt_ids, request.sampling, max_tokens, adapter,
                                                       done.response_id):
                    if chunk.text and done.ttft_seconds is None:
                        done.ttft_seconds = time.perf_counter() - started
                        self._metrics.ttft_seconds.observe(done.ttft_seconds)
                    done.completion_tokens += chunk.new_tokens
                    done.finish_reason = chunk.finish_reason or done.finish_reason
                    if chunk.text:
                        parts.append(chunk.text)
                        yield chunk.text
            done.text = "".join(parts)
            done.latency_seconds = time.perf_counter() - started
            yield done
        finally:
            if not done.text:  # stopped early (cancelled or failed): log what was generated
                done.text = "".join(parts)
                done.latency_seconds = time.perf_counter() - started
            self._metrics.prompt_tokens.inc(done.prompt_tokens)
            self._metrics.completion_tokens.inc(done.completion_tokens)
            self._store.log_exchange(request, done)

    async def generate(self, request: GenerationRequest) -> Completion:
        async for event in self.stream(request):
            if isinstance(event, Completion):
                return event
        raise AssertionError("stream ended without a completion")

    def _max_tokens(self, request: GenerationRequest, prompt_tokens: int) -> int:
        room = self._engine.max_model_len - prompt_tokens
        if room < 1:
            raise InvalidRequest(f"the prompt has {prompt_tokens} tokens; the model's context holds "
                                 f"{self._engine.max_model_len} in all, prompt and answer")
        asked = request.sampling.max_tokens
        if asked is None:
            return min(self._default_max_tokens, room)
        if asked > room:
            raise InvalidRequest(f"max_tokens {asked} does not fit: the prompt has {prompt_tokens} tokens and "
                                 f"the context {self._engine.max_model_len}, leaving {room}")
        return asked
