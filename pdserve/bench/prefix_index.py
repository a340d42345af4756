"""How fast the prefix index and the routing policy are: decisions per second and KV
events indexed per second, on a Mooncake-format trace or a synthetic one.

Each request is routed by the real RoutingPolicy over N workers that each keep an LRU
cache of `blocks_per_worker` blocks; the chosen worker's stores and evictions go back
to the index as msgpack-encoded KV-event batches, decoded as the subscriber decodes
them. There is no time model: a request counts as running for the next
`requests_in_flight` requests. Issue-level routing quality (TTFT, hot spots) is
`pdserve bench route`'s job; this measures the router's own cost.

    pdserve bench prefix-index [TRACE.jsonl] [--num-workers 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from common.kv_events import BlockRemoved, BlockStored, KVEventBatch, decode_batch, encode_batch
from common.protocol import WorkerRole
from pdserve.bench.trace import load_trace
from router.policy import PolicyWeights, RoutingPolicy
from router.prefix_index import PrefixIndex
from router.worker_state import WorkerState


@dataclass
class BenchResult:
    num_requests: int
    num_workers: int
    decisions_per_s: float
    events_per_s: float  # KV events decoded and indexed per second
    blocks_per_s: float  # block hashes in those events per second
    hit_rate: float  # prompt blocks found cached on the chosen worker / prompt blocks
    load_imbalance: float  # max / mean of per-worker uncached prompt blocks
    total_s: float


def synthetic_trace(num_requests: int = 4000, num_prefixes: int = 200, seed: int = 0) -> list[list[int]]:
    """Requests that share one of `num_prefixes` system prompts and then go their own way."""
    rng = random.Random(seed)
    prefixes = [[rng.getrandbits(64) for _ in range(rng.randint(1, 40))] for _ in range(num_prefixes)]
    return [
        rng.choice(prefixes) + [rng.getrandbits(64) for _ in range(rng.randint(1, 40))]
        for _ in range(num_requests)
    ]


class _LRUWorker:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def run(self, hashes: Sequence[int]) -> list:
        """Use `hashes` as a prompt: keep what is there, store the rest, evict the oldest."""
        events: list = []
        new = [h for h in hashes if h not in self.blocks]
        for h in hashes:
            if h in self.blocks:
                self.blocks.move_to_end(h)
            else:
                self.blocks[h] = None
        evicted = []
        while len(self.blocks) > self.capacity:
            evicted.append(self.blocks.popitem(last=False)[0])
        if new:
            events.append(BlockStored(block_hashes=new, parent_block_hash=None, token_ids=[], block_size=1))
        if evicted:
            events.append(BlockRemoved(block_hashes=evicted))
        return events


def run_benchmark(
    trace: list[list[int]],
    num_workers: int = 8,
    blocks_per_worker: int | None = None,
    requests_in_flight: int = 16,
    weights: PolicyWeights | None = None,
    block_size: int = 512,
) -> BenchResult:
    distinct = len({h for hashes in trace for h in hashes})
    capacity = blocks_per_worker or max(1, distinct // 10)
    index = PrefixIndex()
    # this bench measures the index: hits are what it promised, and its events arrive at
    # once, so the policy's claims on prompts not yet published would only blur that
    weights = dataclasses.replace(weights or PolicyWeights(), pending_prefix_s=0.0)
    policy = RoutingPolicy(index, block_size=block_size, weights=weights)
    workers = [WorkerState(f"w{i}", WorkerRole.DECODE, f"sim://{i}") for i in range(num_workers)]
    caches = {w.worker_id: _LRUWorker(capacity) for w in workers}
    in_flight: deque[tuple[WorkerState, str]] = deque()
    uncached = dict.fromkeys(caches, 0)
    decide_s = index_s = 0.0
    events = blocks = hits = prompt_blocks = 0

    start = time.perf_counter()
    for n, hashes in enumerate(trace):
        t0 = time.perf_counter()
        worker, decision = policy.choose(workers, hashes, len(hashes) * block_size)
        decide_s += time.perf_counter() - t0

        worker.note_request_sent(str(n), decision.new_prefill_tokens, len(hashes) - decision.overlap_blocks)
        in_flight.append((worker, str(n)))
        if len(in_flight) > requests_in_flight:
            done_worker, done_id = in_flight.popleft()
            done_worker.note_request_finished(done_id)
        hits += decision.overlap_blocks
        prompt_blocks += len(hashes)
        uncached[worker.worker_id] += len(hashes) - decision.overlap_blocks

        payload = encode_batch(KVEventBatch(ts=0.0, events=caches[worker.worker_id].run(hashes)))
        t0 = time.perf_counter()
        batch = decode_batch(payload)
        index.apply_batch(worker.worker_id, batch)
        index_s += time.perf_counter() - t0
        events += len(batch.events)
        blocks += sum(len(e.block_hashes) for e in batch.events)
    total_s = time.perf_counter() - start

    mean_uncached = sum(uncached.values()) / num_workers
    return BenchResult(
        num_requests=len(trace),
        num_workers=num_workers,
        decisions_per_s=len(trace) / decide_s if decide_s else float("inf"),
        events_per_s=events / index_s if index_s else float("inf"),
        blocks_per_s=blocks / index_s if index_s else float("inf"),
        hit_rate=hits / prompt_blocks if prompt_blocks else 0.0,
        load_imbalance=max(uncached.values()) / mean_uncached if mean_uncached else 1.0,
        total_s=total_s,
    )


def add_prefix_index_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", nargs="?", help="Mooncake-format JSONL trace; synthetic when left out")
    parser.add_argument(
        "--num-workers", type=int, default=8, help="Workers the router's index and policy route over."
    )
    parser.add_argument(
        "--blocks-per-worker", type=int, default=None, help="default: a tenth of the distinct blocks"
    )
    parser.add_argument(
        "--requests-in-flight",
        type=int,
        default=16,
        help="Requests that count as running on their worker (its load) until this many later ones are routed.",
    )


def run_prefix_index_bench(args: argparse.Namespace) -> int:
    """Replay the trace (or a synthetic one) and print the figures as JSON."""
    trace = [list(r.hash_ids) for r in load_trace(args.trace)] if args.trace else synthetic_trace()
    result = run_benchmark(trace, args.num_workers, args.blocks_per_worker, args.requests_in_flight)
    print(json.dumps(vars(result), indent=2))
    return 0
