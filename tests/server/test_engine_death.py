"""When the inference engine dies, the server says so (health NOT_SERVING) and exits with status 1 for a
supervisor to restart it, rather than lingering as a server that accepts requests it cannot answer."""

from __future__ import annotations

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..conftest import ServerProcess

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_dead_engine_turns_health_to_not_serving_and_stops_the_server(tmp_path, model_dir):
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log")
    server.start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=300)
            statuses = [next(watch).status]
            engines = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                       if "EngineCore" in p.name() + " ".join(p.cmdline())]
            assert engines, "no vLLM engine process found under the server"
            for process in engines:
                process.kill()
            try:
                for reply in watch:
                    statuses.append(reply.status)
            except grpc.RpcError:
                pass  # the server went away after saying NOT_SERVING
        assert server.proc.wait(timeout=120) == 1
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert statuses[0] == SERVING and NOT_SERVING in statuses[1:], statuses
    assert "the inference engine died" in server.log_path.read_text()
