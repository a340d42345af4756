"""A real `pdserve serve` for the client commands' tests (chat, complete, run-batch --url),
started once for the session, only by the tests that ask for it."""

from __future__ import annotations

import pytest

from tests.harness.stack import ServeStack

API_KEY = "cli-secret"
MAX_MODEL_LEN = 512


@pytest.fixture(scope="session")
def api_server():
    serve = ServeStack(
        [
            "--dtype", "float32", "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN),
            "--num-gpu-blocks-override", "96", "--api-key", API_KEY, "--disable-uvicorn-access-log",
            "--worker-health-timeout", "30",
        ]
    )  # fmt: skip
    try:
        yield serve.ready()
    finally:
        serve.stop()
