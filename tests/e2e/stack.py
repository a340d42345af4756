"""Real pdserve processes on loopback for the end-to-end tests: `pdserve serve` (workers
and a router) and extra `pdserve router` processes in front of the same workers. Every
wait is bounded, and every process is stopped (SIGTERM, then SIGKILL) afterwards."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
_WORKER_LINE = re.compile(
    r"pdserve serve: (prefill|decode) worker \d+ \S+ at (tcp://\S+) \(metrics on port (\d+)\)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


class _Process:
    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.log = tempfile.NamedTemporaryFile(prefix=f"pdserve-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pdserve.cli.main", *argv],
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=_env(),
        )

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def wait_healthy(url: str, process: _Process, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        process.check_running()
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{process.name} was not healthy within {timeout_s:.0f} s:\n{process.tail()}")


class ServeStack(_Process):
    """`pdserve serve ARGS --port P`, ready once it prints its URL."""

    def __init__(self, args: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__("serve", ["serve", *args, "--port", str(self.port)])
        self.workers: dict[str, list[tuple[str, int]]] = {"prefill": [], "decode": []}

    def ready(self, timeout_s: float = START_TIMEOUT_S) -> ServeStack:
        deadline = time.monotonic() + timeout_s
        while "pdserve serve: ready at" not in self.output():
            self.check_running()
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pdserve serve was not ready within {timeout_s:.0f} s:\n{self.tail()}")
            time.sleep(0.2)
        for role, address, metrics_port in _WORKER_LINE.findall(self.output()):
            self.workers[role].append((address, int(metrics_port)))
        return self

    def addresses(self, role: str) -> list[str]:
        return [address for address, _ in self.workers[role]]

    def children(self) -> list[int]:
        """The pids of the processes this one started (from /proc)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            match = re.search(r"^PPid:\s+(\d+)", status, re.MULTILINE)
            if match and int(match.group(1)) == self.proc.pid:
                pids.append(int(entry.name))
        return pids


class RouterProcess(_Process):
    """`pdserve router ARGS --port P`, ready once its /health is 200."""

    def __init__(self, args: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(
            "router", ["router", *args, "--port", str(self.port), "--disable-uvicorn-access-log"]
        )

    def ready(self, timeout_s: float = START_TIMEOUT_S) -> RouterProcess:
        try:
            wait_healthy(self.url, self, timeout_s)
        except RuntimeError:
            self.stop()
            raise
        return self


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of the Prometheus series `name` at `url`/metrics whose labels include `labels`."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        base, _, rest = series.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return False


def read_ready_file(process, ready_file: Path, timeout_s: float = START_TIMEOUT_S) -> dict:
    """The JSON a worker writes to --ready-file once it serves; the worker is stopped and the
    error carries its output if it exits or takes longer than timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not ready_file.exists():
        process.check_running()
        if time.monotonic() > deadline:
            process.stop()
            raise RuntimeError(
                f"the {process.name} worker was not ready within {timeout_s:.0f} s:\n{process.tail()}"
            )
        time.sleep(0.1)
    return json.loads(ready_file.read_text())


class WorkerProcess(_Process):
    """`pdserve prefill|decode ARGS` on free ports, ready once it writes its ready file."""

    def __init__(self, role: str, args: list[str], workdir: Path) -> None:
        self.ready_file = workdir / f"{role}-{free_port()}.json"
        super().__init__(
            role,
            [role, *args, "--worker-address", "tcp://127.0.0.1:0", "--ready-file", str(self.ready_file),
             "--metrics-port", "0"],
        )  # fmt: skip
        self.info: dict = {}

    def ready(self, timeout_s: float = START_TIMEOUT_S) -> WorkerProcess:
        self.info = read_ready_file(self, self.ready_file, timeout_s)
        return self

    @property
    def address(self) -> str:
        return self.info["address"]
