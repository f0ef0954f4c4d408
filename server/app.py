"""Starts the service: model, store, keys, engine, router, gRPC (TLS optional; health and reflection) and
/metrics; stops it cleanly on SIGTERM or SIGINT (in-flight requests finish, queued logs are committed)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from instructd.v1 import instructd_pb2 as pb
from instructd.v1 import instructd_pb2_grpc as pb_grpc

from .access import Access
from .config import ADMIN_KEY_FILE, ENV_API_KEY, TUNER_KEY_FILE, ServerConfig
from .domain import Limits
from .engine import VllmEngine
from .inference import Inference
from .interceptor import CallGate
from .lifetime import end_with_this_process
from .limits import RateLimiter
from .metrics import Metrics, TuningCollector, serve_metrics
from .model import default_model
from .peers import Peers
from .router import AdapterRouter
from .service import AccessServicer, AdminServicer, FeedbackServicer, InferenceServicer
from .store import Store
from .tuning_service import TuningServicer

log = logging.getLogger("instructd")
SERVICES = ("Inference", "Feedback", "Admin", "Access", "Tuning")
RETENTION_EVERY = 3600.0  # seconds between deletions of expired exchanges


async def serve(config: ServerConfig) -> None:
    """Runs the service until SIGTERM or SIGINT."""
    model = config.model or await asyncio.to_thread(default_model, config.cache_dir)
    if not (model / "config.json").is_file():
        raise SystemExit(f"instructd: {model} is not a Hugging Face model folder (no config.json)")
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the database, the keys, the adapter copies
    config.adapter_dir.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(CollectorRegistry())
    store = Store(config.db_path, on_batch=metrics.write_batch)
    access = await Access.open(store)
    if config.auth:
        await access.local_admin_key(config.data_dir / ADMIN_KEY_FILE)
    metrics.registry.register(TuningCollector(store.tuning_summary))
    # Bound before the engine starts, which takes free ports of its own (torch.distributed's): a port chosen for us
    # but not yet bound can be taken meanwhile (a test's was, once). Until gRPC serves, instructd_health_serving is 0.
    metrics_port = serve_metrics(metrics, config.metrics_host, config.metrics_port)
    engine = VllmEngine(config, model)
    background: list[asyncio.Task] = []
    try:
        router = AdapterRouter(config, engine, store, metrics)
        await router.restore()
        peers = Peers(config, await store.replica_id(config.replica_id))
        server, health_servicer = _grpc_server(config, access, Inference(engine, router, store, metrics, config, peers),
                                               router, store, metrics, peers)
        port = _listen(server, config)
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        metrics.health_serving.set(1)
        log.info("instructd serving %s on %s:%d%s as replica %s (metrics on %s:%d/metrics, data in %s)", model.name,
                 config.host, port, " with TLS" if config.tls else "", peers.replica_id, config.metrics_host,
                 metrics_port, config.data_dir)
        if config.retention_days:
            background.append(asyncio.create_task(_expire(store, config.retention_days)))
        tuner = await _start_tuner(config, access, model, port) if config.tuner and not config.tls else None
        if config.tuner and config.tls:
            log.warning("with TLS, start the tuner yourself, with the CA (and client certificate) it needs: "
                        "INSTRUCTD_API_KEY=<a tuner key> INSTRUCTD_TLS_CA=ca.pem instructd tuner --target %s:%d",
                        config.host, port)
        died = await _until_signalled_or_dead(engine)
        if tuner:
            tuner.terminate()  # an interrupted run is cleaned up by the tuner's next start
        if died:
            log.error("the inference engine died: NOT_SERVING, stopping (exit status 1) for a supervisor to restart")
            await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        else:
            log.info("stopping: draining requests in flight (up to %gs)", config.drain_seconds)
        metrics.health_serving.set(0)
        await health_servicer.enter_graceful_shutdown()
        await server.stop(1.0 if died else config.drain_seconds)  # a dead engine answers nothing: no drain
        await peers.close()
    finally:
        for task in background:
            task.cancel()
        await asyncio.to_thread(store.close)
        engine.shutdown()
    if died:
        raise SystemExit(1)
    log.info("stopped")


def _grpc_server(config: ServerConfig, access: Access, inference: Inference, router: AdapterRouter, store: Store,
                 metrics: Metrics, peers: Peers) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    rate_limits = {"/instructd.v1.Inference/Generate": RateLimiter(config.generate_per_second, "generation requests"),
                   "/instructd.v1.Feedback/Submit": RateLimiter(config.feedback_per_second, "ratings")}
    rate_limits["/instructd.v1.Inference/GenerateStream"] = rate_limits["/instructd.v1.Inference/Generate"]
    gate = CallGate(access.keyring if config.auth else None, rate_limits, metrics)
    server = grpc.aio.server(interceptors=[gate], options=[
        ("grpc.max_receive_message_length", config.max_request_bytes)])
    limits = Limits.from_config(config)
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(inference, limits), server)
    pb_grpc.add_FeedbackServicer_to_server(FeedbackServicer(store, metrics, limits, peers), server)
    pb_grpc.add_AdminServicer_to_server(AdminServicer(router, store), server)
    pb_grpc.add_AccessServicer_to_server(AccessServicer(access, store), server)
    pb_grpc.add_TuningServicer_to_server(TuningServicer(config, router, store), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [pb.DESCRIPTOR.services_by_name[s].full_name for s in SERVICES]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return server, health_servicer


def _listen(server: grpc.aio.Server, config: ServerConfig) -> int:
    address = f"{config.host}:{config.port}"
    if not config.tls:
        if not _loopback(config.host):
            log.warning("serving gRPC on %s WITHOUT TLS: API keys and every prompt cross the network in clear; "
                        "pass --tls-cert and --tls-key", config.host)
        return server.add_insecure_port(address)
    credentials = grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=config.tls_client_ca.read_bytes() if config.tls_client_ca else None,
        require_client_auth=config.tls_client_ca is not None)
    return server.add_secure_port(address, credentials)


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _start_tuner(config: ServerConfig, access: Access, model, port: int) -> subprocess.Popen:
    """The tuner runs in its own process, so training never stalls serving; it gets a tuner key of its own,
    through its environment (never on its command line, which any local user can read)."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    command = [sys.executable, "-m", "instructd.client.cli", "tuner", "--target", f"{host}:{port}",
               "--work-dir", str(config.data_dir / "tuner"), "--model", str(model)]
    env = dict(os.environ)
    if config.auth:
        env[ENV_API_KEY] = await access.tuner_key(config.data_dir / TUNER_KEY_FILE)
    log.info("starting the tuner: %s", " ".join(command[2:]))
    tuner = subprocess.Popen(command, env=env)
    end_with_this_process([tuner.pid])  # a restarted server never runs beside its killed predecessor's tuner
    return tuner


async def _expire(store: Store, days: float) -> None:
    """Deletes exchanges older than the retention period, unless an adapter was trained on them."""
    while True:
        before = (datetime.now(timezone.utc) - timedelta(days=days)).isoformat(timespec="milliseconds")
        try:
            deleted = await store.delete_expired(before)
            if deleted:
                log.info("retention: deleted %d exchanges older than %g days", deleted, days)
        except Exception:
            log.exception("retention: deleting expired exchanges failed; trying again in %gs", RETENTION_EVERY)
        await asyncio.sleep(RETENTION_EVERY)


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
