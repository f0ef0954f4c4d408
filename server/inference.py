"""Answers chat requests: admits them (bounded), checks them against the context, routes them to an adapter,
streams the engine's output, and logs each exchange exactly once, committed before the answer is sent."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Future

from .canary import audience
from .config import ServerConfig
from .domain import BASE_VERSION, Completion, GenerationRequest
from .engine import Engine
from .errors import InvalidRequest, Unavailable
from .limits import Admission
from .metrics import Metrics
from .peers import Peers
from .router import AdapterRouter
from .store import Store

log = logging.getLogger(__name__)
Emit = Callable[[str], Awaitable[None]]
# A token is rarely more than a few characters of text; a prompt this many times longer than the context
# cannot fit, and is refused before tokenizing it would cost anything.
CHARS_PER_TOKEN_BOUND = 32


class Inference:
    """The generation use case, independent of gRPC."""

    def __init__(self, engine: Engine, router: AdapterRouter, store: Store, metrics: Metrics, config: ServerConfig,
                 peers: Peers) -> None:
        self._engine, self._router, self._store, self._metrics = engine, router, store, metrics
        self._default_max_tokens, self._durable = config.default_max_tokens, config.durable_answers
        self._admission, self._peers = Admission(config.max_in_flight), peers

    def new_response_id(self) -> str:
        """Unique across replicas: this replica's id, then 128 random bits."""
        return self._peers.new_response_id(uuid.uuid4().hex)

    async def run(self, request: GenerationRequest, response_id: str, emit: Emit | None = None) -> Completion:
        """Generates the answer, passing each text delta to `emit`, and returns it once its exchange is
        committed. If the caller goes away (cancelled, deadline) the engine request is aborted at once and
        the exchange is logged with what was generated."""
        with self._admission.admit():
            started = time.perf_counter()
            if request.characters > CHARS_PER_TOKEN_BOUND * self._engine.max_model_len:
                raise InvalidRequest(f"the prompt has {request.characters} characters, far more than the model's "
                                     f"context of {self._engine.max_model_len} tokens holds; refused unread")
            prompt_ids = await self._engine.render(request.messages)
            max_tokens = self._max_tokens(request, len(prompt_ids))
            adapter = await self._router.route(request.adapter, audience(request.user_id, response_id))
            done = Completion(response_id, "", "abort", len(prompt_ids), 0,
                              adapter.version if adapter else BASE_VERSION)
            parts: list[str] = []
            try:
                with self._router.serving(adapter):
                    chunks = self._engine.stream(prompt_ids, request.sampling, max_tokens, adapter, response_id)
                    async with contextlib.aclosing(chunks):  # aborts the engine request the moment we stop
                        async for chunk in chunks:
                            if chunk.text and done.ttft_seconds is None:
                                done.ttft_seconds = time.perf_counter() - started
                                self._metrics.ttft_seconds.observe(done.ttft_seconds)
                            done.completion_tokens += chunk.new_tokens
                            done.finish_reason = chunk.finish_reason or done.finish_reason
                            if chunk.text:
                                parts.append(chunk.text)
                                if emit:
                                    await emit(chunk.text)
            except BaseException:
                self._log(request, done, parts, started)  # queued, not awaited: the caller is gone or failed
                raise
            committed = self._log(request, done, parts, started)
            if self._durable:
                await self._committed(committed)
            return done

    def _log(self, request: GenerationRequest, done: Completion, parts: list[str], started: float) -> Future:
        done.text = "".join(parts)
        done.latency_seconds = time.perf_counter() - started
        self._metrics.prompt_tokens.inc(done.prompt_tokens)
        self._metrics.completion_tokens.inc(done.completion_tokens)
        future = self._store.log_exchange(request, done)
        future.add_done_callback(self._check_logged)
        return future

    def _check_logged(self, future: Future) -> None:
        """Runs in the writer thread: a failed log write is counted and logged, never silently dropped."""
        if future.exception() is not None:
            self._metrics.log_write_failures.inc()
            log.error("an exchange could not be logged", exc_info=future.exception())

    async def _committed(self, future: Future) -> None:
        started = time.perf_counter()
        try:
            await asyncio.wrap_future(future)
        except Exception as exc:
            raise Unavailable("the answer could not be stored, so it could not be rated; retry") from exc
        self._metrics.commit_seconds.observe(time.perf_counter() - started)

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
