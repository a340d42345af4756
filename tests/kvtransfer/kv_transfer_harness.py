"""Harness for the KV-transfer tests: a producer engine in its own process, consumers in
the test process, and what both agree each block holds.

Run as a script, this file is the producer process: it reads one JSON command a line on stdin and answers one JSON line on
stdout ({"ok": result} or {"error": text}); everything else it prints goes to stderr.
Commands: create (a producer connector over a KV cache filled by `block_content`),
export, take_freed, stats, close. Imported, it gives the test side `ProducerProcess`,
`make_consumer`, `local_cache`, `wait_pull` and `block_content`.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
REPLY_TIMEOUT_S = 60.0  # a cold start imports torch and NIXL
CONSUMER_BLOCKS = 16


def block_content(spec, block_id: int):
    """What producer block `block_id` holds: distinct, reproducible values in any process."""
    import torch

    generator = torch.Generator().manual_seed(1_000_003 * (block_id + 1))
    return torch.randn(spec.kv_cache_shape(1)[1:], generator=generator, dtype=torch.float32)


class ProducerProcess:
    def __init__(self) -> None:
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=REPO,
            text=True,
        )

    def request(self, command: str, **args: Any) -> Any:
        self.proc.stdin.write(json.dumps({"command": command, **args}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the producer process did not answer {command!r}:\n{self.stderr_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the producer process failed on {command!r}: {reply['error']}")
        return reply["ok"]

    def create(
        self, connector: str, spec, num_blocks: int, extra: dict | None = None, device: str = "cpu"
    ) -> tuple[str, Any]:
        """A producer connector in the process: (its key, its side-channel address)."""
        result = self.request(
            "create",
            connector=connector,
            spec=spec.to_dict(),
            num_blocks=num_blocks,
            extra=extra or {},
            device=device,
        )
        return result["key"], tuple(result["address"])

    def export(self, key: str, request_id: str, block_ids: list[int], num_tokens: int) -> dict:
        return self.request(
            "export", key=key, request_id=request_id, block_ids=block_ids, num_tokens=num_tokens
        )

    def take_freed(self, key: str) -> list[str]:
        return self.request("take_freed", key=key)

    def stats(self, key: str) -> dict:
        return self.request("stats", key=key)

    def wait_freed(self, key: str, request_id: str, timeout_s: float = 10.0) -> float:
        """Seconds until the producer lets `request_id`'s blocks go; fails after `timeout_s`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if request_id in self.take_freed(key):
                return time.monotonic() - start
            time.sleep(0.02)
        raise AssertionError(f"the producer still holds {request_id!r} after {timeout_s} s")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.request("close")
                self.proc.wait(timeout=10)
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._stderr.close()

    def stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-4000:]


def make_consumer(connector: str, spec, num_blocks: int = CONSUMER_BLOCKS, device: str = "cpu", **extra):
    """A consumer connector in this process over a zeroed KV cache; small TCP reads, so
    that a pull of a few blocks already takes several."""
    import torch

    from common.config.kv_transfer_config import KVTransferConfig
    from kvtransfer.factory import create_connector

    extra = {"transfer_timeout_s": 5.0, "tcp_chunk_bytes": 2048, "tcp_window": 2, **extra}
    config = KVTransferConfig.from_dict(
        {"kv_connector": connector, "kv_role": "kv_consumer", "kv_connector_extra_config": extra}
    )
    consumer = create_connector(config, "kv_consumer", spec)
    consumer.register_kv_cache(torch.zeros(spec.kv_cache_shape(num_blocks), device=device))
    return consumer


def local_cache(consumer):
    """The KV tensor a consumer from `make_consumer` pulls into."""
    return consumer._consumer.region.tensor


def wait_pull(consumer, request_id: str, timeout_s: float = 10.0) -> str | None:
    """None once the pull is done, its error text if it failed; fails after `timeout_s`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        done, failed = consumer.poll()
        assert set(done) | {rid for rid, _ in failed} <= {request_id}, (done, failed)
        if request_id in done:
            return None
        if failed:
            return failed[0][1]
        time.sleep(0.005)
    raise AssertionError(f"pull of {request_id!r} neither finished nor failed in {timeout_s} s")


def _serve() -> None:
    # stdout carries the replies alone: the C libraries' prints go to stderr
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.path.insert(0, str(REPO))
    import torch

    from common.config.kv_transfer_config import KVTransferConfig
    from kvtransfer.factory import create_connector
    from kvtransfer.kv_cache_spec import KVCacheSpec

    torch.set_num_threads(1)
    connectors: dict[str, Any] = {}
    for line in sys.stdin:
        message = json.loads(line)
        command = message["command"]
        try:
            if command == "create":
                spec = KVCacheSpec(**message["spec"])
                config = KVTransferConfig.from_dict(
                    {
                        "kv_connector": message["connector"],
                        "kv_role": "kv_producer",
                        "kv_port": 0,
                        "kv_connector_extra_config": message["extra"],
                    }
                )
                connector = create_connector(config, "kv_producer", spec)
                kv_cache = torch.zeros(spec.kv_cache_shape(message["num_blocks"]), device=message["device"])
                for b in range(1, message["num_blocks"]):
                    kv_cache[b] = block_content(spec, b).to(message["device"])
                connector.register_kv_cache(kv_cache)
                key = f"producer-{len(connectors)}"
                connectors[key] = (connector, kv_cache)
                result: Any = {"key": key, "address": list(connector.side_channel_address)}
            elif command == "export":
                connector = connectors[message["key"]][0]
                result = connector.export_blocks(
                    message["request_id"], message["block_ids"], message["num_tokens"]
                )
            elif command == "take_freed":
                result = connectors[message["key"]][0].take_freed_requests()
            elif command == "stats":
                result = connectors[message["key"]][0].stats()
            elif command == "close":
                for connector, _ in connectors.values():
                    connector.close()
                replies.write(json.dumps({"ok": None}) + "\n")
                replies.flush()
                return
            else:
                raise ValueError(f"unknown command {command!r}")
            reply = {"ok": result}
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    _serve()
