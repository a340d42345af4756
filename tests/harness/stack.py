"""Real pdserve processes on loopback (or inside a network namespace): workers, routers and
`pdserve serve`, one class each over one process wrapper. Every wait is bounded, every
process is stopped (SIGTERM, then SIGKILL after STOP_TIMEOUT_S), and each one's output goes
to a log file that outlives restarts, so a failure can show it."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import httpx

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300.0  # a cold start imports torch and loads the model on a shared machine
STOP_TIMEOUT_S = 30.0
_WORKER_LINE = re.compile(
    r"pdserve serve: (prefill|decode) worker \d+ \S+ at (tcp://\S+) \(metrics on port (\d+)\)"
)


def free_port() -> int:
    """A port free now, for a process started later to bind. Drawn below the kernel's
    ephemeral range: a port the kernel hands out for a bind to port 0 or an outgoing
    connection (workers, ZMQ, NIXL, clients) never lands on it in between."""
    low, _ = _ephemeral_range()
    for _ in range(200):
        port = _rng.randrange(max(1024, low - _OWN_RANGE), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below the ephemeral range ({low}) after 200 tries")


_OWN_RANGE = 12000  # ports free_port draws from, just below the ephemeral range
_rng = random.SystemRandom()  # not the tests' seeded generator: two runs must not draw alike


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return low, high


def free_address(host: str = "127.0.0.1") -> str:
    """A worker address fixed before start, so a killed worker can come back at it."""
    return f"tcp://{host}:{free_port()}"


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


def wait_until(
    condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1
) -> float:
    """Poll `condition()` until it is true and return how long that took; fail after
    `timeout_s`. A connection error counts as not yet: a process may still be coming up."""
    started = time.monotonic()
    last_error: BaseException | None = None
    while True:
        try:
            if condition():
                return time.monotonic() - started
        except (urllib.error.URLError, OSError, httpx.HTTPError) as exc:
            last_error = exc
        if time.monotonic() - started > timeout_s:
            because = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"{what} did not happen in {timeout_s:.0f} s{because}")
        time.sleep(interval_s)


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


class PdserveProcess:
    """`python -m pdserve.cli.main ARGV`, optionally inside network namespace `netns`."""

    def __init__(self, name: str, argv: list[str], *, netns: str | None = None, start: bool = True) -> None:
        self.name = name
        self.argv = argv
        self.netns = netns
        fd, path = tempfile.mkstemp(prefix=f"pdserve-{name}-", suffix=".log")
        os.close(fd)
        self.log = Path(path)
        self.proc: subprocess.Popen[bytes] | None = None
        if start:
            self.start()

    def start(self) -> PdserveProcess:
        """Start it (again, after kill() or stop()); its output is appended to the same log."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} is already running")
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "pdserve.cli.main", *self.argv],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def check_running(self) -> None:
        assert self.proc is not None, f"{self.name} was never started"
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Send `sig` (SIGTERM), SIGKILL if it lingers past STOP_TIMEOUT_S; its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """kill -9, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)

    def _fail_start(self, why: str) -> NoReturn:
        self.stop()
        raise RuntimeError(f"{self.name} {why}:\n{self.tail()}")


class WorkerProcess(PdserveProcess):
    """`pdserve prefill|decode ARGS`, ready once it writes its ready file. By default it binds
    a port of its own choosing; give `address` (see free_address) to restart it at the same one."""

    def __init__(
        self,
        role: str,
        args: list[str],
        workdir: Path,
        *,
        address: str = "tcp://127.0.0.1:0",
        netns: str | None = None,
        start: bool = True,
    ) -> None:
        self.role = role
        self.bind_address = address
        self.ready_file = workdir / f"{role}-{uuid.uuid4().hex[:8]}.json"
        self.info: dict = {}
        argv = [
            role, *args, "--worker-address", address, "--ready-file", str(self.ready_file), "--metrics-port", "0",
        ]  # fmt: skip
        super().__init__(role, argv, netns=netns, start=start)

    def start(self) -> WorkerProcess:
        self.ready_file.unlink(missing_ok=True)  # a restart must not look ready before it is
        super().start()
        return self

    def ready(self, timeout_s: float = START_TIMEOUT_S) -> WorkerProcess:
        """Wait for the ready file; stop the worker and fail with its log if it exits or is late."""
        deadline = time.monotonic() + timeout_s
        while not self.ready_file.exists():
            self.check_running()
            if time.monotonic() > deadline:
                self._fail_start(f"worker was not ready within {timeout_s:.0f} s")
            time.sleep(0.05)
        self.info = json.loads(self.ready_file.read_text())
        return self

    @property
    def address(self) -> str:
        """Where it serves: the address it was given, or the one it reported if it chose."""
        return self.info["address"] if self.bind_address.endswith(":0") else self.bind_address

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.info['metrics_port']}"

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.metrics_url, name, **labels)


class RouterProcess(PdserveProcess):
    """`pdserve router ARGS` on `host`:`port` (a free loopback port by default)."""

    def __init__(
        self,
        args: list[str],
        *,
        host: str | None = None,
        port: int | None = None,
        netns: str | None = None,
        start: bool = True,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://{host or '127.0.0.1'}:{self.port}"
        host_flag = ["--host", host] if host else []
        argv = ["router", *args, *host_flag, "--port", str(self.port), "--disable-uvicorn-access-log"]
        super().__init__("router", argv, netns=netns, start=start)

    def ready(self, timeout_s: float = START_TIMEOUT_S, *, require_healthy: bool = True) -> RouterProcess:
        """Wait until /health says 200; with require_healthy=False any answer will do (a 503
        only says a role has no healthy worker yet)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_running()
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return self
            except urllib.error.HTTPError:
                if not require_healthy:
                    return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self._fail_start(f"was not {'healthy' if require_healthy else 'up'} within {timeout_s:.0f} s")


class ServeStack(PdserveProcess):
    """`pdserve serve ARGS --port P` (workers and a router), ready once it prints its URL."""

    def __init__(self, args: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers: dict[str, list[tuple[str, int]]] = {"prefill": [], "decode": []}
        super().__init__("serve", ["serve", *args, "--port", str(self.port)])

    def ready(self, timeout_s: float = START_TIMEOUT_S) -> ServeStack:
        deadline = time.monotonic() + timeout_s
        while "pdserve serve: ready at" not in self.output():
            self.check_running()
            if time.monotonic() > deadline:
                self._fail_start(f"was not ready within {timeout_s:.0f} s")
            time.sleep(0.2)
        for role, address, metrics_port in _WORKER_LINE.findall(self.output()):
            self.workers[role].append((address, int(metrics_port)))
        return self

    def addresses(self, role: str) -> list[str]:
        return [address for address, _ in self.workers[role]]

    def stop_checked(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then assert it exited 0 and every process it started is gone within
        `grace_s` (a module-scoped stack fixture's teardown)."""
        children = self.children()
        status = self.stop()
        deadline = time.monotonic() + grace_s
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [pid for pid in children if alive(pid)]
        assert status == 0, self.tail()
        assert children and not left, f"processes left after SIGTERM: {left}"

    def children(self) -> list[int]:
        """The pids of the processes this one started (from /proc)."""
        assert self.proc is not None
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


def local_prefill_router(stack: ServeStack, max_model_len: int) -> RouterProcess:
    """A second router (not started) over a serve stack's workers that prefills every prompt
    on the decode workers: the aggregated path beside the stack's disaggregated one."""
    return RouterProcess(
        [
            "--decode-workers", ",".join(stack.addresses("decode")),
            "--prefill-workers", ",".join(stack.addresses("prefill")),
            "--max-model-len", str(max_model_len),
            "--local-prefill-threshold", "1000000",
            "--worker-health-timeout", "30",
        ]
    )  # fmt: skip


def router_healthy(router_url: str, worker: str) -> bool:
    return metric(router_url, "pdserve_router_worker_healthy", worker=worker) == 1.0


def start_stack(workers: list[WorkerProcess], router: RouterProcess, admit_timeout_s: float = 60.0) -> None:
    """Start the (not yet started) workers together, wait for each, then the router, until it
    counts every worker healthy. The caller stops them all (stop_all) whatever happens."""
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.ready()
    router.start().ready(require_healthy=False)
    for worker in workers:
        wait_until(lambda w=worker: router_healthy(router.url, w.address), admit_timeout_s,
                   f"the router admitting {worker.address}", interval_s=0.2)  # fmt: skip


def stop_all(processes: list[PdserveProcess]) -> None:
    for process in processes:
        process.stop()


@contextmanager
def running_pair(
    workdir: Path, prefill_args: list[str], decode_args: list[str]
) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    """A prefill and a decode worker, started together and ready; both stopped on exit."""
    prefill = WorkerProcess("prefill", prefill_args, workdir)
    decode = WorkerProcess("decode", decode_args, workdir)
    try:
        yield prefill.ready(), decode.ready()
    finally:
        stop_all([prefill, decode])
