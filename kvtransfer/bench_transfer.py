"""KV-transfer throughput on loopback: a producer process exports blocks, this process
pulls them through each connector, and the bytes per second of the pulls are printed.

    python -m kvtransfer.bench_transfer --connectors TcpConnector NixlConnector --mib 256

A block has the default model's geometry (SmolLM2-135M in bfloat16: 30 layers, 3 KV
heads, head size 64, 16 tokens: 360 KiB) unless the flags say otherwise. A first pull
does the handshake and is not timed; every timed pull moves all blocks of one request,
from start_pull() until poll() reports it, and the last one is checked byte for byte.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from common.config.kv_transfer_config import KVTransferConfig
from kvtransfer.factory import create_connector
from kvtransfer.kv_cache_spec import KVCacheSpec

POLL_INTERVAL_S = 0.0002
REPLY_TIMEOUT_S = 120.0


@dataclass
class TransferBenchResult:
    connector: str
    device: str
    num_blocks: int
    block_bytes: int
    seconds: list[float]  # one per timed pull

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def median_gb_per_s(self) -> float:
        return self.num_bytes / statistics.median(self.seconds) / 1e9

    @property
    def best_gb_per_s(self) -> float:
        return self.num_bytes / min(self.seconds) / 1e9

    def summary(self) -> str:
        return (
            f"{self.connector:14s} {self.device:5s} {self.num_bytes / 2**20:8.1f} MiB in {self.num_blocks} blocks of "
            f"{self.block_bytes / 1024:.0f} KiB: median {statistics.median(self.seconds) * 1e3:8.2f} ms "
            f"= {self.median_gb_per_s:6.2f} GB/s (best {self.best_gb_per_s:.2f} GB/s, {len(self.seconds)} pulls)"
        )


def _fill_value(block_id: int) -> int:
    return block_id % 251


def _producer_main(pipe: Any, connector: str, spec: dict[str, Any], num_blocks: int, device: str) -> None:
    """The producer process: a cache whose block b holds bytes equal to b % 251."""
    kv_spec = KVCacheSpec(**spec)
    config = KVTransferConfig.from_dict({"kv_connector": connector, "kv_role": "kv_producer", "kv_port": 0})
    producer = create_connector(config, "kv_producer", kv_spec)
    cache = torch.empty(kv_spec.kv_cache_shape(num_blocks), dtype=torch.bfloat16, device=device)
    as_bytes = cache.view(torch.uint8).view(num_blocks, -1)
    for b in range(num_blocks):
        as_bytes[b].fill_(_fill_value(b))
    producer.register_kv_cache(cache)
    pipe.send("ready")
    while True:
        command = pipe.recv()
        if command is None:
            break
        request_id, block_ids = command
        pipe.send(producer.export_blocks(request_id, block_ids, len(block_ids) * kv_spec.block_size))
    producer.close()


def bench_transfer(
    connector: str,
    *,
    mib: float = 256,
    spec: KVCacheSpec | None = None,
    pulls: int = 5,
    device: str = "cpu",
) -> TransferBenchResult:
    """Time `pulls` pulls of about `mib` MiB each from a producer process through `connector`."""
    spec = spec or KVCacheSpec(
        "bench", "bfloat16", num_kv_heads=3, head_size=64, num_layers=30, block_size=16
    )
    block_bytes = spec.num_layers * 2 * spec.num_kv_heads * spec.block_size * spec.head_size * 2
    num_blocks = max(1, round(mib * 2**20 / block_bytes))
    cache_blocks = num_blocks + 1  # block 0 is the null block on both sides

    context = multiprocessing.get_context("spawn")
    pipe, child_pipe = context.Pipe()
    process = context.Process(
        target=_producer_main, args=(child_pipe, connector, spec.to_dict(), cache_blocks, device), daemon=True
    )
    process.start()
    config = KVTransferConfig.from_dict(
        {
            "kv_connector": connector,
            "kv_role": "kv_consumer",
            "kv_connector_extra_config": {"transfer_timeout_s": 120},
        }
    )
    consumer = create_connector(config, "kv_consumer", spec)
    cache = torch.zeros(spec.kv_cache_shape(cache_blocks), dtype=torch.bfloat16, device=device)
    consumer.register_kv_cache(cache)
    try:
        _expect(pipe, "ready")
        remote_ids = list(range(1, cache_blocks))
        local_ids = remote_ids[::-1]  # a different block for each, to catch misplaced copies
        seconds = []
        for i in range(pulls + 1):
            pipe.send((f"bench-{i}", remote_ids))
            params = _expect(pipe)
            start = time.perf_counter()
            consumer.start_pull(f"bench-{i}", params, local_ids, remote_ids)
            while True:
                done, failed = consumer.poll()
                if failed:
                    raise RuntimeError(f"{connector} pull failed: {failed[0][1]}")
                if done:
                    break
                time.sleep(POLL_INTERVAL_S)
            if i > 0:  # the first pull includes the handshake
                seconds.append(time.perf_counter() - start)
        _check(cache, local_ids, remote_ids)
    finally:
        consumer.close()
        pipe.send(None)
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    return TransferBenchResult(connector, device, num_blocks, block_bytes, seconds)


def _expect(pipe: Any, wanted: Any = ...) -> Any:
    if not pipe.poll(REPLY_TIMEOUT_S):
        raise RuntimeError("the producer process did not answer")
    reply = pipe.recv()
    if wanted is not ... and reply != wanted:
        raise RuntimeError(f"the producer process answered {reply!r}")
    return reply


def _check(cache: torch.Tensor, local_ids: list[int], remote_ids: list[int]) -> None:
    as_bytes = cache.view(torch.uint8).view(cache.shape[0], -1)
    expected = torch.tensor([_fill_value(r) for r in remote_ids], dtype=torch.uint8, device=cache.device)
    got = as_bytes[local_ids]
    if not bool((got == expected[:, None]).all()):
        raise RuntimeError("the pulled blocks differ from the producer's")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connectors", nargs="+", default=["TcpConnector", "NixlConnector"])
    parser.add_argument("--mib", type=float, default=256, help="MiB per pull (default 256)")
    parser.add_argument("--pulls", type=int, default=5, help="timed pulls per connector (default 5)")
    parser.add_argument("--device", default="cpu", help="where both KV caches live: cpu or cuda")
    parser.add_argument("--num-layers", type=int, default=30)
    parser.add_argument("--num-kv-heads", type=int, default=3)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args(argv)
    spec = KVCacheSpec(
        "bench", "bfloat16", args.num_kv_heads, args.head_size, args.num_layers, args.block_size
    )
    for connector in args.connectors:
        result = bench_transfer(connector, mib=args.mib, spec=spec, pulls=args.pulls, device=args.device)
        print(result.summary(), flush=True)


if __name__ == "__main__":
    main()
