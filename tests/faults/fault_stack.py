"""Real pdserve processes for the fault tests: workers on an address the test chooses (so a
killed one can come back at the same place), routers, and an SSE client that records
what a streaming client sees. A command may run inside a network namespace
(`ip netns exec NAME ...`). Every wait is bounded; every process is stopped afterwards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.e2e.stack import REPO, free_port, metric, read_ready_file

START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
ENGINE_FLAGS = [
    "--dtype", "float32", "--device", "cpu", "--max-model-len", "1024", "--num-gpu-blocks-override", "256",
]  # fmt: skip


def events_config(host: str = "127.0.0.1") -> str:
    return json.dumps(
        {"enable_kv_cache_events": True, "endpoint": f"tcp://{host}:*", "replay_endpoint": f"tcp://{host}:*"}
    )


class Proc:
    """`pdserve ARGV`, optionally inside network namespace `netns`, its output in a file."""

    def __init__(self, name: str, argv: list[str], netns: str | None = None) -> None:
        self.name = name
        self.argv = argv
        self.netns = netns
        self.log = Path(tempfile.mkstemp(prefix=f"pdserve-{name}-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "pdserve.cli.main", *self.argv],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        return self

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def check_running(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def kill(self) -> None:
        """kill -9, and reap it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Worker(Proc):
    """`pdserve prefill|decode` listening on `address` (fixed, so a restart reuses it)."""

    def __init__(self, role: str, args: list[str], workdir: Path, address: str | None = None,
                 netns: str | None = None) -> None:  # fmt: skip
        self.address = address or f"tcp://127.0.0.1:{free_port()}"
        self.ready_file = workdir / f"{role}-{self.address.rsplit(':', 1)[1]}.json"
        super().__init__(
            role,
            [role, *args, "--worker-address", self.address, "--ready-file", str(self.ready_file),
             "--metrics-port", "0"],
            netns,
        )  # fmt: skip
        self.info: dict = {}

    def start(self) -> Worker:
        self.ready_file.unlink(missing_ok=True)
        super().start()
        return self

    def ready(self, timeout_s: float = START_TIMEOUT_S) -> Worker:
        self.info = read_ready_file(self, self.ready_file, timeout_s)
        return self


class Router(Proc):
    """`pdserve router ARGS` on `host`:`port`, ready once /health answers (200 or 503)."""

    def __init__(self, args: list[str], host: str = "127.0.0.1", port: int | None = None,
                 netns: str | None = None) -> None:  # fmt: skip
        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        super().__init__(
            "router",
            ["router", *args, "--host", host, "--port", str(self.port), "--disable-uvicorn-access-log"],
            netns,
        )

    def ready(self, timeout_s: float = START_TIMEOUT_S) -> Router:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_running()
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5):
                    return self
            except urllib.error.HTTPError:
                return self  # answering; a 503 only says a role has no healthy worker yet
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the router was not up within {timeout_s:.0f} s:\n{self.tail()}")


def wait_for(what: str, condition, timeout_s: float, interval_s: float = 0.2) -> float:
    """Poll `condition()` until it is true; return how long it took; fail after `timeout_s`."""
    started = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - started
        except (urllib.error.URLError, OSError, httpx.HTTPError):
            pass
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(interval_s)


def healthy(router_url: str, worker: str) -> bool:
    return metric(router_url, "pdserve_router_worker_healthy", worker=worker) == 1.0


def routed(router_url: str, worker: str) -> float:
    return metric(router_url, "pdserve_router_requests_routed_total", worker=worker)


def index_blocks(router_url: str, worker: str) -> float:
    return metric(router_url, "pdserve_router_prefix_index_blocks", worker=worker)


@dataclass
class StreamResult:
    """What one streaming client saw: each `data:` payload (JSON or "[DONE]") in order."""

    events: list = field(default_factory=list)
    first_chunk: threading.Event = field(default_factory=threading.Event)
    finished_at: float | None = None
    failure: BaseException | None = None

    @property
    def errors(self) -> list[dict]:
        return [e["error"] for e in self.events if isinstance(e, dict) and "error" in e]

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    @property
    def chunks(self) -> list[dict]:
        return [e for e in self.events if isinstance(e, dict) and "choices" in e]


def stream_in_background(url: str, body: dict, timeout_s: float) -> tuple[StreamResult, threading.Thread]:
    """POST a streaming /v1/completions in a thread; the result fills as events arrive."""
    result = StreamResult()

    def run() -> None:
        try:
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                              timeout=timeout_s) as response:  # fmt: skip
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    result.events.append(data if data == "[DONE]" else json.loads(data))
                    if "choices" in result.events[-1]:
                        result.first_chunk.set()
        except BaseException as exc:  # noqa: BLE001 - recorded for the test to report
            result.failure = exc
        finally:
            result.finished_at = time.monotonic()
            result.first_chunk.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return result, thread


def complete(
    url: str, prompt: str | list[int], max_tokens: int = 4, timeout_s: float = 120.0
) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, timeout=timeout_s)
