"""A real redis-server on a free loopback port for the registry tests, nothing persisted.

Every wait is bounded; stop() ends the process this helper started (SIGTERM, then
SIGKILL) and start() brings a fresh, empty one up on the same port (a Redis restart).
"""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import redis

from tests.harness.stack import free_port

START_TIMEOUT_S = 15.0


class RedisServer:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "the registry tests need redis-server on PATH; install it (apt-get install -y redis-server)"
            )
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        client = self.client()
        try:
            while True:
                if self.proc.poll() is not None:
                    pytest.fail(f"redis-server on port {self.port} exited with {self.proc.returncode}")
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"redis-server on port {self.port} did not answer within {START_TIMEOUT_S} s")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll `condition()` until it returns something true; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s} s")
        time.sleep(interval_s)
