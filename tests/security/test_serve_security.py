"""`pdserve serve` with an API key and a cluster secret, as an operator runs it: every
process listens on loopback only; the whole stack answers through the authenticated
worker and KV side-channel messages; a router without the secret is refused by the
workers; the API key and prompts never reach the logs unless --enable-log-requests
(and then cut to --max-log-len); the h11 limits hold on the real HTTP server."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import pytest

from tests.harness.stack import RouterProcess, ServeStack

API_KEY = "sk-h6-secret-key-5f1d9c"
MARKER = "ZEBRA-MARKER-7731"
PROMPT = f"{MARKER} lives in a house by the sea and it is a long way from the city centre"
ENGINE_FLAGS = [
    "--load-format", "dummy", "--dtype", "float32", "--device", "cpu", "--max-model-len", "512",
    "--num-gpu-blocks-override", "64",
]  # fmt: skip
MAX_EVENT_SIZE = 16 * 1024
MAX_HEADERS = 40
LOG_LEN = 24
BODY = '{"prompt": "' + PROMPT + '", "max_tokens": 4}'


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve-secret") / "cluster-secret"
    path.write_text("0f3a9c2e5b7d41a8b6c0e9f2d4a7b1c3\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def stack(secret_file):
    serve = ServeStack(
        [
            *ENGINE_FLAGS,
            "--cluster-secret-file", str(secret_file),
            "--api-key", API_KEY,
            "--num-prefill-workers", "1",
            "--local-prefill-threshold", "0",  # every prompt crosses prefill -> side channel -> decode
            "--worker-health-timeout", "30",
            "--h11-max-header-count", str(MAX_HEADERS),
            "--h11-max-incomplete-event-size", str(MAX_EVENT_SIZE),
        ]
    )  # fmt: skip
    try:
        yield serve.ready()
    finally:
        serve.stop()


def _complete(url: str, key: str = API_KEY) -> httpx.Response:
    return httpx.post(
        url + "/v1/completions",
        content=BODY.encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=120,
    )


@pytest.fixture(scope="module")
def answered(stack):
    """The stack after answering the marker prompt through prefill, KV transfer and decode."""
    response = _complete(stack.url)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4
    return stack


def _listening(pid: int) -> list[tuple[str, str]]:
    """(protocol, local address) of every TCP socket listening and UDP socket bound in `pid`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode in inodes and (table.startswith("udp") or state == "0A"):  # 0A: LISTEN
                found.append((table, _address(local)))
    return found


def _address(hex_address: str) -> str:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw[::-1])}:{int(port, 16)}"
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]:{int(port, 16)}"


def test_every_process_serve_starts_listens_on_loopback_only(answered):
    children = answered.children()
    assert len(children) == 3  # prefill, decode, router
    sockets = {pid: _listening(pid) for pid in children}
    assert all(sockets.values()), sockets
    exposed = [
        (pid, proto, address)
        for pid, found in sockets.items()
        for proto, address in found
        if not (
            address.startswith("127.") or address.startswith("[::1]") or address.startswith("[::ffff:127.")
        )
    ]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_neither_the_api_key_nor_the_prompt_is_logged_by_default(answered):
    assert _complete(answered.url, key="sk-wrong-guess-1234").status_code == 401
    time.sleep(0.5)  # the access log line of the last request
    output = answered.output()
    assert "POST /v1/completions" in output  # the access log is on, and shows no more than this
    assert API_KEY not in output and "sk-wrong-guess-1234" not in output
    assert MARKER not in output


def test_a_router_without_the_cluster_secret_is_refused_by_the_workers(answered):
    outsider = RouterProcess(
        ["--decode-workers", ",".join(answered.addresses("decode")), "--max-model-len", "512"]
    )
    try:
        # its Hello is dropped, so no load report ever comes back and /health stays 503
        deadline = time.monotonic() + 90
        while "unauthenticated message" not in answered.output():
            outsider.check_running()
            assert time.monotonic() < deadline, "the workers never logged the outsider's dropped messages"
            time.sleep(0.2)
        statuses = []
        while len(statuses) < 10:
            outsider.check_running()
            assert time.monotonic() < deadline, "the outsider router never answered /health"
            try:
                statuses.append(httpx.get(outsider.url + "/health", timeout=5).status_code)
            except httpx.TransportError:
                pass  # uvicorn not listening yet
            time.sleep(0.3)
        assert set(statuses) == {503}
    finally:
        outsider.stop()


def test_with_enable_log_requests_the_prompt_is_logged_cut_to_max_log_len(answered, secret_file):
    router = RouterProcess(
        [
            "--decode-workers", ",".join(answered.addresses("decode")),
            "--prefill-workers", ",".join(answered.addresses("prefill")),
            "--max-model-len", "512", "--worker-health-timeout", "30",
            "--cluster-secret-file", str(secret_file), "--api-key", API_KEY,
            "--enable-log-requests", "--max-log-len", str(LOG_LEN),
        ]
    )  # fmt: skip
    try:
        router.ready(120)
        assert _complete(router.url).status_code == 200
        time.sleep(0.5)
        logged = router.output()
        assert BODY[:LOG_LEN] in logged and BODY[: LOG_LEN + 1] not in logged
        assert API_KEY not in logged
    finally:
        router.stop()


def test_the_h11_limits_hold_on_the_real_server(answered):
    url = answered.url + "/v1/models"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    many = {**auth, **{f"x-h{i}": "1" for i in range(MAX_HEADERS + 5)}}
    assert httpx.get(url, headers=many, timeout=10).status_code == 431
    assert (
        httpx.get(url, headers={**auth, "x-big": "y" * (MAX_EVENT_SIZE + 1)}, timeout=10).status_code == 431
    )
    big_body = {"prompt": "z" * (MAX_EVENT_SIZE + 1), "max_tokens": 1}
    assert (
        httpx.post(answered.url + "/v1/completions", json=big_body, headers=auth, timeout=10).status_code
        == 413
    )
    assert httpx.get(url, headers=auth, timeout=10).status_code == 200  # and it keeps serving
