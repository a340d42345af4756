"""Synthetic request traces of shapes the Mooncake trace does not have, in its format
(arrival, input and output length, ids of 512-token blocks), so that `pdserve bench
route` can judge a routing policy on workloads it was not tuned on.

- conversation: chat sessions of several turns; each turn's prompt is the whole
  conversation so far (a shared system prompt, then every earlier user message and
  answer), so prefixes grow turn by turn and belong to one session.
- agent: agent tasks of several tool-calling steps; every step's prompt starts with one
  of a few long tool prompts (popular ones far more often), then the task and the
  observations so far: long prefixes shared by many concurrent tasks.
- bursty: single requests over a few shared prefixes of varied length, arriving in
  bursts (a Poisson process switching between a high and a low rate).
- rag: retrieval-augmented questions: a system prompt, then 1-3 documents drawn from a
  pool of long ones by Zipf popularity, then a short question; prefixes are shared only
  as far as the first document, so most of a prompt is a partial hit at best.
- mixed: all of the above at once, each at a fraction of its rate, block ids kept apart,
  so that no one shape sets the router's load.
- lora: many fine-tunes of one base model: each request names one of N LoRA adapters
  (Zipf-popular) and starts with that adapter's system prompt; the adapter is part of
  every block's identity, as in a block hash. Its requests are LoRATraceRequests.

The first three (seed 0) and the Mooncake trace are what the router's defaults were
tuned on; rag, mixed and every other seed were written for reporting only
(docs/routing.md, "Why these defaults"). lora came later, for the adapter-affinity
scorer; the suite replays it only when named (SUITE_WORKLOADS are the rest).

Each is seeded, so a name and a seed always give the same trace. Block ids follow the
content: a block's id names its tokens and everything before them (as a chained block
hash does), so equal ids are equal prefixes and a partial last block gets its own id.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from pdserve.bench.trace import TRACE_BLOCK_SIZE, TraceRequest

Segment = tuple[object, int]  # (what names its tokens, how many tokens)


class _BlockIds:
    """Ids for the 512-token blocks of prompts built from named segments of tokens."""

    def __init__(self) -> None:
        self._ids: dict[tuple, int] = {}

    def of(self, segments: list[Segment]) -> tuple[int, ...]:
        ids: list[int] = []
        parent = -1
        block: list[tuple[object, int, int]] = []  # (segment name, from, to) in this block
        room = TRACE_BLOCK_SIZE
        for name, length in segments:
            at = 0
            while at < length:
                take = min(room, length - at)
                block.append((name, at, at + take))
                at += take
                room -= take
                if room == 0:
                    parent = self._id(parent, block)
                    ids.append(parent)
                    block, room = [], TRACE_BLOCK_SIZE
        if block:
            ids.append(self._id(parent, block))
        return tuple(ids)

    def _id(self, parent: int, block: list) -> int:
        key = (parent, tuple(block))
        found = self._ids.get(key)
        if found is None:
            found = self._ids[key] = len(self._ids)
        return found


def _lognormal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(max(rng.lognormvariate(math.log(median), sigma), low), high))


def conversation(
    seed: int = 0, duration_s: float = 1000.0, sessions_per_s: float = 0.6
) -> list[TraceRequest]:
    """Multi-turn chat: sessions start as a Poisson process; each has one of 30 system
    prompts (1k-6k tokens, Zipf-popular), 2-20 turns of 100-4k-token user messages, answers
    of 30-1k tokens, and 5-120 s between a turn's answer and the next message."""
    rng = random.Random(seed)
    ids = _BlockIds()
    systems = [_lognormal(rng, 2500, 0.6, 1000, 6000) for _ in range(30)]
    zipf = [1 / (k + 1) for k in range(len(systems))]
    requests: list[TraceRequest] = []
    t, session = 0.0, 0
    while True:
        t += rng.expovariate(sessions_per_s)
        if t >= duration_s:
            break
        session += 1
        system = rng.choices(range(len(systems)), zipf)[0]
        context: list[Segment] = [(("system", system), systems[system])]
        turns = min(2 + int(rng.expovariate(1 / 5)), 20)
        at = t
        for turn in range(turns):
            context.append((("user", session, turn), _lognormal(rng, 400, 1.0, 100, 4000)))
            output = _lognormal(rng, 200, 0.8, 30, 1000)
            length = sum(n for _, n in context)
            requests.append(TraceRequest(at, length, output, ids.of(context)))
            context.append((("answer", session, turn), output))
            at += output / 50 + rng.uniform(5, 120)  # the answer streams, then the user thinks
    return _sorted(requests)


def agent(seed: int = 0, duration_s: float = 1000.0, tasks_per_s: float = 0.5) -> list[TraceRequest]:
    """Tool-calling agents: tasks start as a Poisson process; each uses one of 12 tool
    prompts (8k-30k tokens, the most popular far more often), a 200-3k-token task, then
    3-15 steps, each adding an answer of 20-400 tokens and a tool result of 100-6k tokens,
    with 0.5-8 s of tool time between steps."""
    rng = random.Random(seed + 1)
    ids = _BlockIds()
    tools = [_lognormal(rng, 14000, 0.4, 8000, 30000) for _ in range(12)]
    zipf = [1 / (k + 1) ** 1.2 for k in range(len(tools))]
    requests: list[TraceRequest] = []
    t, task = 0.0, 0
    while True:
        t += rng.expovariate(tasks_per_s)
        if t >= duration_s:
            break
        task += 1
        tool = rng.choices(range(len(tools)), zipf)[0]
        context: list[Segment] = [
            (("tools", tool), tools[tool]),
            (("task", task), _lognormal(rng, 800, 0.8, 200, 3000)),
        ]
        steps = min(3 + int(rng.expovariate(1 / 4)), 15)
        at = t
        for step in range(steps):
            output = _lognormal(rng, 100, 0.8, 20, 400)
            length = sum(n for _, n in context)
            requests.append(TraceRequest(at, length, output, ids.of(context)))
            context.append((("call", task, step), output))
            context.append((("result", task, step), _lognormal(rng, 800, 1.0, 100, 6000)))
            at += output / 50 + rng.uniform(0.5, 8.0)
    return _sorted(requests)


def bursty(seed: int = 0, duration_s: float = 1000.0, mean_rate: float = 3.0) -> list[TraceRequest]:
    """Single requests on/off: bursts of 5-30 s at 4× the mean rate, quiet spells of
    10-60 s at a quarter of it (`mean_rate` averaged over time, roughly). Each prompt is
    one of 40 shared prefixes (500-20k tokens, Zipf-popular) plus its own 50-3k tokens."""
    rng = random.Random(seed + 2)
    ids = _BlockIds()
    prefixes = [_lognormal(rng, 4000, 1.0, 500, 20000) for _ in range(40)]
    zipf = [1 / (k + 1) for k in range(len(prefixes))]
    # time-average rate: (17.5 × 4 + 35 × 0.25) / 52.5 ≈ 1.5 × mean_rate; scaled back below
    high, low = 4 * mean_rate / 1.5, 0.25 * mean_rate / 1.5
    requests: list[TraceRequest] = []
    t, n, burst = 0.0, 0, True
    spell_end = rng.uniform(5, 30)
    while t < duration_s:
        t += rng.expovariate(high if burst else low)
        while t >= spell_end:
            burst = not burst
            spell_end += rng.uniform(5, 30) if burst else rng.uniform(10, 60)
        if t >= duration_s:
            break
        n += 1
        prefix = rng.choices(range(len(prefixes)), zipf)[0]
        context: list[Segment] = [
            (("prefix", prefix), prefixes[prefix]),
            (("own", n), _lognormal(rng, 500, 1.0, 50, 3000)),
        ]
        output = _lognormal(rng, 150, 0.8, 10, 1000)
        requests.append(TraceRequest(t, sum(k for _, k in context), output, ids.of(context)))
    return _sorted(requests)


def rag(seed: int = 0, duration_s: float = 1000.0, rate: float = 2.5) -> list[TraceRequest]:
    """Retrieval-augmented questions as a Poisson process: one of 4 system prompts (800-2.5k
    tokens), then 1-3 distinct documents of a pool of 200 (300-12k tokens, Zipf-popular with
    exponent 0.9, in retrieval order), then a 20-400-token question; answers of 20-600 tokens."""
    rng = random.Random(seed + 3)
    ids = _BlockIds()
    systems = [_lognormal(rng, 1500, 0.4, 800, 2500) for _ in range(4)]
    documents = [_lognormal(rng, 2500, 0.7, 300, 12000) for _ in range(200)]
    popularity = [1 / (k + 1) ** 0.9 for k in range(len(documents))]
    requests: list[TraceRequest] = []
    t, n = 0.0, 0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            break
        n += 1
        system = rng.randrange(len(systems))
        chosen: list[int] = []
        for _ in range(rng.randint(1, 3)):
            doc = rng.choices(range(len(documents)), popularity)[0]
            if doc not in chosen:
                chosen.append(doc)
        context: list[Segment] = [(("system", system), systems[system])]
        context += [(("doc", d), documents[d]) for d in chosen]
        context.append((("question", n), _lognormal(rng, 80, 0.8, 20, 400)))
        output = _lognormal(rng, 150, 0.8, 20, 600)
        requests.append(TraceRequest(t, sum(k for _, k in context), output, ids.of(context)))
    return _sorted(requests)


# Block ids of one source of `mixed` start at its index times this: apart from the others'.
_MIXED_ID_STRIDE = 1 << 40


def mixed(seed: int = 0, duration_s: float = 1000.0) -> list[TraceRequest]:
    """conversation, agent, bursty and rag interleaved, each at 40 % of its own default rate."""
    sources = [
        conversation(seed, duration_s, sessions_per_s=0.24),
        agent(seed, duration_s, tasks_per_s=0.2),
        bursty(seed, duration_s, mean_rate=1.2),
        rag(seed, duration_s, rate=1.0),
    ]
    requests = [
        TraceRequest(
            r.arrival_s, r.input_length, r.output_length, tuple(k * _MIXED_ID_STRIDE + h for h in r.hash_ids)
        )
        for k, source in enumerate(sources)
        for r in source
    ]
    return _sorted(requests)


@dataclass(frozen=True)
class LoRATraceRequest(TraceRequest):
    """A request of a trace that names a LoRA adapter (None: the base model)."""

    lora_name: str | None = None


def lora_of(request: TraceRequest) -> str | None:
    """The adapter `request` names; None for the base model and for plain trace requests."""
    return request.lora_name if isinstance(request, LoRATraceRequest) else None


def lora(
    seed: int = 0,
    duration_s: float = 1000.0,
    rate: float = 4.0,
    num_adapters: int = 16,
    zipf_s: float = 1.1,
) -> list[TraceRequest]:
    """Single requests as a Poisson process, each naming one of `num_adapters` adapters
    ("lora-0" the most popular; popularity 1/rank^zipf_s: at 16 and 1.1 the first takes a
    third of the requests, the last 1.6 %). Each adapter serves one application: its own
    system prompt (500-4k tokens), then the request's own 20-4k-token message; answers of
    10-1k tokens."""
    if num_adapters < 1:
        raise ValueError(f"--num-loras must be at least 1, got {num_adapters}")
    rng = random.Random(seed + 4)
    ids = _BlockIds()
    systems = [_lognormal(rng, 1500, 0.6, 500, 4000) for _ in range(num_adapters)]
    popularity = [1 / (k + 1) ** zipf_s for k in range(num_adapters)]
    requests: list[TraceRequest] = []
    t, n = 0.0, 0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            break
        n += 1
        adapter = rng.choices(range(num_adapters), popularity)[0]
        # the adapter names the first segment, so every block id of the prompt carries it
        context: list[Segment] = [(("system", adapter), systems[adapter])]
        context.append((("user", n), _lognormal(rng, 300, 1.0, 20, 4000)))
        output = _lognormal(rng, 150, 0.8, 10, 1000)
        length = sum(k for _, k in context)
        requests.append(LoRATraceRequest(t, length, output, ids.of(context), f"lora-{adapter}"))
    return _sorted(requests)


def _sorted(requests: list[TraceRequest]) -> list[TraceRequest]:
    requests.sort(key=lambda r: r.arrival_s)  # stable: a session's turns keep their order
    return requests


WORKLOADS: dict[str, Callable[..., list[TraceRequest]]] = {
    "conversation": conversation,
    "agent": agent,
    "bursty": bursty,
    "rag": rag,
    "mixed": mixed,
    "lora": lora,
}
# What the router's defaults were tuned on (with seed 0); the rest are held out.
TUNING_WORKLOADS = ("conversation", "agent", "bursty")
# What `pdserve bench route --suite` replays when no --workload is given.
SUITE_WORKLOADS = ("conversation", "agent", "bursty", "rag", "mixed")


def generate(name: str, seed: int = 0, **options: int | float) -> list[TraceRequest]:
    """The synthetic workload `name` (one of WORKLOADS) with `seed`; `options` are the
    workload's own keyword arguments (lora: num_adapters)."""
    try:
        make = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}") from None
    return make(seed=seed, **options)
