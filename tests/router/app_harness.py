"""The router app served by a real uvicorn in a thread, in front of fake workers, for
the HTTP tests (tests/router/test_app_*.py)."""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from common.model_files import embedded_default_model
from common.openai_api import ServedModel
from common.tokenizer import load_tokenizer
from router.app import create_app
from router.config import RouterConfig
from tests.router.fake_worker import FakeWorker

SERVED_NAMES = ["smollm2", "smollm2-alias"]
MAX_MODEL_LEN = 256
VOCAB_SIZE = 49152


def served_model(tokenizer) -> ServedModel:
    return ServedModel(
        names=list(SERVED_NAMES), max_model_len=MAX_MODEL_LEN, tokenizer=tokenizer, vocab_size=VOCAB_SIZE
    )


class LiveRouter:
    def __init__(self, config: RouterConfig, served: ServedModel) -> None:
        self.app = create_app(config, served)
        self.context = self.app.state.router
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        uv_config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="on",
            http="h11",
            h11_max_incomplete_event_size=config.max_event_size + 64 * 1024,
        )
        self.server = uvicorn.Server(uv_config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self) -> LiveRouter:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the router did not start within 10 s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(10)
        self._sock.close()

    def wait_healthy(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                return
            time.sleep(0.05)
        raise RuntimeError("the router's workers did not become healthy")


@contextmanager
def running_router(
    served: ServedModel,
    decode: list[FakeWorker],
    prefill: list[FakeWorker] | None = None,
    wait_healthy: bool = True,
    start_workers: bool = True,
    **config_fields,
) -> Iterator[LiveRouter]:
    """Fake workers started, a router in front of them, everything stopped afterwards."""
    prefill = prefill or []
    if start_workers:
        for worker in [*decode, *prefill]:
            worker.start()
    config = RouterConfig(
        decode_workers=[w.address for w in decode],
        prefill_workers=[w.address for w in prefill],
        **config_fields,
    )
    router = LiveRouter(config, served)
    try:
        router.start()
        if wait_healthy:
            router.wait_healthy()
        yield router
    finally:
        router.stop()
        for worker in [*decode, *prefill]:
            worker.stop()


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a streamed response, in order, checking the framing."""
    events = []
    for block in response.text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), f"not an SSE data event: {block!r}"
        events.append(block[len("data: ") :])
    return events


@functools.lru_cache(maxsize=1)
def embedded_tokenizer():
    """The embedded model's tokenizer, loaded once per test process (it takes seconds)."""
    return load_tokenizer(embedded_default_model())


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    """The response has `status` and the OpenAI error body; returns its "error" object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == status
    assert isinstance(error["message"], str) and error["message"]
    return error
