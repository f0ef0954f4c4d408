"""Starts the service: model, store, engine, router, gRPC (with health and reflection) and /metrics;
stops it cleanly on SIGTERM or SIGINT (in-flight requests finish, queued logs are committed)."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from instructd.v1 import instructd_pb2 as pb
from instructd.v1 import instructd_pb2_grpc as pb_grpc

from .config import ServerConfig
from .engine import VllmEngine
from .inference import Inference
from .metrics import Metrics, TuningCollector, serve_metrics
from .model import default_model
from .router import AdapterRouter
from .service import AdminServicer, FeedbackServicer, InferenceServicer
from .store import Store

log = logging.getLogger("instructd")
SERVICES = ("Inference", "Feedback", "Admin")


async def serve(config: ServerConfig) -> None:
    """Runs the service until SIGTERM or SIGINT."""
    model = config.model or await asyncio.to_thread(default_model, config.cache_dir)
    if not (model / "config.json").is_file():
        raise SystemExit(f"instructd: {model} is not a Hugging Face model folder (no config.json)")
    config.adapter_dir.mkdir(parents=True, exist_ok=True)
    store = Store(config.db_path)
    metrics = Metrics(CollectorRegistry())
    metrics.registry.register(TuningCollector(config.db_path))
    engine = VllmEngine(config, model)
    try:
        router = AdapterRouter(config, engine, store, metrics)
        await router.restore()
        inference = Inference(engine, router, store, metrics, config.default_max_tokens)
        server, health_servicer = _grpc_server(inference, router, store, metrics)
        port = server.add_insecure_port(f"{config.host}:{config.port}")
        metrics_port = serve_metrics(metrics, config.host, config.metrics_port)
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("instructd serving %s on %s:%d (metrics on :%d/metrics, data in %s)",
                 model.name, config.host, port, metrics_port, config.data_dir)
        tuner = _start_tuner(config, model, port) if config.tuner else None
        died = await _until_signalled_or_dead(engine)
        if tuner:
            tuner.terminate()  # an interrupted run is cleaned up by the tuner's next start
        if died:
            log.error("the inference engine died: NOT_SERVING, stopping (exit status 1) for a supervisor to restart")
            await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        else:
            log.info("stopping: draining requests in flight (up to %gs)", config.drain_seconds)
        await health_servicer.enter_graceful_shutdown()
        await server.stop(1.0 if died else config.drain_seconds)  # a dead engine answers nothing: no drain
    finally:
        await asyncio.to_thread(store.close)
        engine.shutdown()
    if died:
        raise SystemExit(1)
    log.info("stopped")


def _grpc_server(inference: Inference, router: AdapterRouter, store: Store,
                 metrics: Metrics) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    server = grpc.aio.server()
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(inference, metrics), server)
    pb_grpc.add_FeedbackServicer_to_server(FeedbackServicer(store, metrics), server)
    pb_grpc.add_AdminServicer_to_server(AdminServicer(router, store, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [pb.DESCRIPTOR.services_by_name[s].full_name for s in SERVICES]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return server, health_servicer


def _start_tuner(config: ServerConfig, model, port: int) -> subprocess.Popen:
    """The tuner runs in its own process, so training never stalls serving."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    command = [sys.executable, "-m", "instructd.client.cli", "tuner", "--target", f"{host}:{port}",
               "--data-dir", str(config.data_dir), "--adapter-dir", str(config.adapter_dir), "--model", str(model)]
    log.info("starting the tuner: %s", " ".join(command[2:]))
    return subprocess.Popen(command)


async def _until_signalled_or_dead(engine: VllmEngine, every: float = 1.0) -> bool:
    """Waits for SIGTERM or SIGINT (returns False) or for the engine to die (returns True)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not engine.dead:
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
            return False
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
            pass
    return True
