"""`python -m edgespec.edge.server` serves the HTTP API beside gRPC: its URL on the line after
LISTENING, the same bearer token, 127.0.0.1 by default; ``--no-http`` serves none."""

from __future__ import annotations

import ssl

import httpx
import pytest
from support.certs import self_signed_cert
from support.servers import ServerProcess

TOKEN = "cli-s3cret"


def _edge(tiny_pair, verifier, tmp_path, *extra: str) -> ServerProcess:
    args = ["edgespec.edge.server", "--draft", str(tiny_pair.draft_dir)]
    args += ["--verifier", verifier.address, "--token", TOKEN, *extra]
    return ServerProcess(args, tmp_path / "edge.log")


def test_the_edge_server_prints_and_serves_its_http_url(tiny_pair, verifier, tmp_path) -> None:
    server = _edge(tiny_pair, verifier, tmp_path, "--served-model-name", "mine")
    try:
        assert server.wait_listening().startswith("127.0.0.1:")
        line = server.next_line()
        assert line is not None and line.startswith("HTTP http://127.0.0.1:")
        url = line.split()[1]
        body = {"model": "mine", "prompt": "def f(x):", "max_tokens": 5, "temperature": 0}
        auth = {"Authorization": f"Bearer {TOKEN}"}
        reply = httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 401
    finally:
        server.stop()


def test_no_http(tiny_pair, verifier, tmp_path) -> None:
    server = _edge(tiny_pair, verifier, tmp_path, "--no-http")
    try:
        server.wait_listening()
        server.proc.terminate()  # stdout ends: nothing followed LISTENING
        assert server.next_line() is None
    finally:
        server.stop()


def test_with_tls_the_http_api_is_https(tiny_pair, verifier, tmp_path) -> None:
    pytest.importorskip("cryptography", reason="building a test certificate needs cryptography")
    cert, key = self_signed_cert(tmp_path)
    server = _edge(tiny_pair, verifier, tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        server.wait_listening()
        line = server.next_line()
        assert line is not None and line.startswith("HTTP https://127.0.0.1:")
        url = line.split()[1]
        models = httpx.get(
            url + "/v1/models",
            headers={"Authorization": f"Bearer {TOKEN}"},
            verify=ssl.create_default_context(cafile=str(cert)),
        )
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "edgespec"
    finally:
        server.stop()
