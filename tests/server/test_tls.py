"""TLS and mutual TLS round trips against real servers, with certificates made in the test."""

from __future__ import annotations

import grpc
import pytest
from click.testing import CliRunner

from instructd.client import ApiError, Tls
from instructd.client.cli import main as cli
from instructd.server.config import ENV_API_KEY

from ..certs import make_ca
from ..conftest import ServerProcess


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca, issue = make_ca(folder)
    other_ca, other_issue = make_ca(folder / "other", "someone else's CA")
    return {"ca": ca, "server": issue("server", server=True), "client": issue("client", server=False),
            "other_ca": other_ca, "stranger": other_issue("stranger", server=False)}


def _server(root, pki, *extra, tls: Tls) -> ServerProcess:
    cert, key = pki["server"]
    return ServerProcess(root / "data", root / "server.log", "--tls-cert", str(cert), "--tls-key", str(key), *extra,
                         tls=tls)


def test_tls_round_trip(tmp_path, pki):
    with _server(tmp_path, pki, tls=Tls(ca=pki["ca"])) as server:
        with server.client() as client:
            answer = client.generate("Say hi.", max_tokens=4)
            assert client.feedback(answer.response_id, "up")
        for wrong in (None, Tls(ca=pki["other_ca"])):  # in clear, or trusting another CA: no connection
            with server.client(tls=wrong, timeout=10) as client, pytest.raises(ApiError) as error:
                client.stats()
            assert error.value.code == grpc.StatusCode.UNAVAILABLE
        shown = CliRunner().invoke(cli, ["stats", "--target", server.target, "--tls-ca", str(pki["ca"])],
                                   env={ENV_API_KEY: server.api_key})
        assert shown.exit_code == 0 and "serving: base" in shown.output, shown.output
        assert "WITHOUT TLS" not in server.log_path.read_text()


def test_mutual_tls_round_trip(tmp_path, pki):
    cert, key = pki["client"]
    tls = Tls(ca=pki["ca"], cert=cert, key=key)
    with _server(tmp_path, pki, "--tls-client-ca", str(pki["ca"]), tls=tls) as server:
        with server.client() as client:
            assert client.generate("Say hi.", max_tokens=4).text
        stranger_cert, stranger_key = pki["stranger"]
        for wrong in (Tls(ca=pki["ca"]), Tls(ca=pki["ca"], cert=stranger_cert, key=stranger_key)):
            with server.client(tls=wrong, timeout=10) as client, pytest.raises(ApiError) as error:
                client.stats()  # no client certificate, or one the server's CA did not sign
            assert error.value.code == grpc.StatusCode.UNAVAILABLE
        shown = CliRunner().invoke(cli, ["stats", "--target", server.target, "--tls-ca", str(pki["ca"]),
                                         "--tls-cert", str(cert), "--tls-key", str(key)],
                                   env={ENV_API_KEY: server.api_key})
        assert shown.exit_code == 0, shown.output
