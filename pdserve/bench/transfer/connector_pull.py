"""Timed pulls through a connector: a producer process exports blocks filled with known
bytes, this process pulls them (start_pull() until poll() reports it) and checks them."""

from __future__ import annotations

import multiprocessing
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from common.config.kv_transfer_config import KVTransferConfig
from kvtransfer.factory import create_connector
from kvtransfer.kv_cache_spec import KVCacheSpec

REPLY_TIMEOUT_S = 120.0
LLAMA3_8B = {"num_layers": 32, "num_kv_heads": 8, "head_size": 128, "block_size": 16}


@dataclass
class TransferBenchResult:
    connector: str
    device: str
    num_blocks: int
    block_bytes: int
    seconds: list[float]  # one per timed pull, start_pull() to poll() reporting it
    xfer_seconds: list[float] = field(default_factory=list)  # the connector's own transfer times
    # per timed pull, the connector's phase stamps (TransferRecord.phases_ns) plus "polled":
    # when the caller's poll() reported it; empty where the connector records none
    phases: list[dict[str, int]] = field(default_factory=list)
    # the consumer's stats() after the last pull (num_direct_transfers tells the route taken)
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def median_gb_per_s(self) -> float:
        return self.num_bytes / statistics.median(self.seconds) / 1e9

    @property
    def best_gb_per_s(self) -> float:
        return self.num_bytes / min(self.seconds) / 1e9

    @property
    def median_xfer_gb_per_s(self) -> float:
        return self.num_bytes / statistics.median(self.xfer_seconds) / 1e9 if self.xfer_seconds else 0.0

    def summary(self) -> str:
        return (
            f"{self.connector:14s} {self.device:5s} {self.num_bytes / 2**20:8.1f} MiB in {self.num_blocks} blocks of "
            f"{self.block_bytes / 1024:.0f} KiB: median {statistics.median(self.seconds) * 1e3:8.2f} ms "
            f"= {self.median_gb_per_s:6.2f} GB/s (best {self.best_gb_per_s:.2f} GB/s, {len(self.seconds)} pulls)"
        )


def _fill_value(block_id: int) -> int:
    return block_id % 251


def filled_cache(kv_spec: KVCacheSpec, num_blocks: int, device: str) -> torch.Tensor:
    """A cache whose block b holds bytes equal to b % 251."""
    cache = torch.empty(kv_spec.kv_cache_shape(num_blocks), dtype=torch.bfloat16, device=device)
    values = torch.tensor([_fill_value(b) for b in range(num_blocks)], dtype=torch.uint8, device=device)
    cache.view(torch.uint8).view(num_blocks, -1).copy_(values[:, None].expand(num_blocks, -1))
    return cache


def _producer_main(
    pipe: Any, connector: str, spec: dict[str, Any], num_blocks: int, device: str, extra: dict[str, Any]
) -> None:
    kv_spec = KVCacheSpec(**spec)
    config = KVTransferConfig.from_dict(
        {
            "kv_connector": connector,
            "kv_role": "kv_producer",
            "kv_port": 0,
            "kv_connector_extra_config": extra,
        }
    )
    producer = create_connector(config, "kv_producer", kv_spec)
    producer.register_kv_cache(filled_cache(kv_spec, num_blocks, device))
    pipe.send("ready")
    while True:
        command = pipe.recv()
        if command is None:
            break
        request_id, block_ids = command
        pipe.send(producer.export_blocks(request_id, block_ids, len(block_ids) * kv_spec.block_size))
    producer.close()


def default_spec() -> KVCacheSpec:
    return KVCacheSpec("bench", "bfloat16", num_kv_heads=3, head_size=64, num_layers=30, block_size=16)


def block_bytes_of(spec: KVCacheSpec) -> int:
    return spec.num_layers * 2 * spec.num_kv_heads * spec.block_size * spec.head_size * 2


def bench_transfer(
    connector: str,
    *,
    mib: float = 256,
    spec: KVCacheSpec | None = None,
    pulls: int = 5,
    device: str = "cpu",
    extra: dict[str, Any] | None = None,
    poll_sleep_s: float = 0.0,
) -> TransferBenchResult:
    """Time `pulls` pulls of about `mib` MiB each from a producer process through `connector`;
    between polls the caller sleeps `poll_sleep_s` (0: it only yields, a busy poll)."""
    spec = spec or default_spec()
    extra = extra or {}
    block_bytes = block_bytes_of(spec)
    num_blocks = max(1, round(mib * 2**20 / block_bytes))
    cache_blocks = num_blocks + 1  # block 0 is the null block on both sides

    context = multiprocessing.get_context("spawn")
    pipe, child_pipe = context.Pipe()
    process = context.Process(
        target=_producer_main,
        args=(child_pipe, connector, spec.to_dict(), cache_blocks, device, extra),
        daemon=True,
    )
    process.start()
    config = KVTransferConfig.from_dict(
        {
            "kv_connector": connector,
            "kv_role": "kv_consumer",
            "kv_connector_extra_config": {"transfer_timeout_s": 120, **extra},
        }
    )
    consumer = create_connector(config, "kv_consumer", spec)
    cache = torch.zeros(spec.kv_cache_shape(cache_blocks), dtype=torch.bfloat16, device=device)
    consumer.register_kv_cache(cache)
    try:
        expect_reply(pipe, "ready", process)
        remote_ids = list(range(1, cache_blocks))
        local_ids = remote_ids[::-1]  # a different block for each, to catch misplaced copies
        seconds, xfer_seconds, phases = [], [], []
        for i in range(pulls + 1):
            pipe.send((f"bench-{i}", remote_ids))
            params = expect_reply(pipe, process=process)
            consumer.take_transfer_records()
            start = time.perf_counter()
            consumer.start_pull(f"bench-{i}", params, local_ids, remote_ids)
            while True:  # a busy poll: the fastest pulls take a fraction of a millisecond
                done, failed = consumer.poll()
                if failed:
                    raise RuntimeError(f"{connector} pull failed: {failed[0][1]}")
                if done:
                    break
                time.sleep(poll_sleep_s)
            polled = time.perf_counter_ns()
            if i > 0:  # the first pull includes the handshake
                seconds.append(time.perf_counter() - start)
                records = consumer.take_transfer_records()
                xfer_seconds.extend(r.seconds for r in records)
                phases.extend({**r.phases_ns, "polled": polled} for r in records if r.phases_ns)
        check_blocks(cache, local_ids, remote_ids)
        stats = consumer.stats()
    finally:
        consumer.close()
        pipe.send(None)
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    return TransferBenchResult(
        connector, device, num_blocks, block_bytes, seconds, xfer_seconds, phases, stats
    )


def expect_reply(pipe: Any, wanted: Any = ..., process: Any = None) -> Any:
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while not pipe.poll(1.0):
        if process is not None and not process.is_alive():
            raise RuntimeError(f"the producer process died (exit code {process.exitcode}); see its log")
        if time.monotonic() > deadline:
            raise RuntimeError("the producer process did not answer")
    reply = pipe.recv()
    if wanted is not ... and reply != wanted:
        raise RuntimeError(f"the producer process answered {reply!r}")
    return reply


def check_blocks(cache: torch.Tensor, local_ids: list[int], remote_ids: list[int]) -> None:
    as_bytes = cache.view(torch.uint8).view(cache.shape[0], -1)
    expected = torch.tensor([_fill_value(r) for r in remote_ids], dtype=torch.uint8, device=cache.device)
    got = as_bytes[local_ids]
    if not bool((got == expected[:, None]).all()):
        raise RuntimeError("the pulled blocks differ from the producer's")
