"""Warm-up: before a worker says it is ready, run one step of every shape serving will run.

On a GPU the first step of a shape this process has not run yet pays for what happens only
once: Triton compiles each kernel variant the step meets (or loads it from its cache folder,
common/engine/kernel_cache.py), the small-M matmul autotunes per weight shape, cuBLAS picks
its algorithms and the caching allocator grows to the step's peak. Left to the first
requests, that is seconds of TTFT (median 2.6 s at concurrency 8 on an H100, against about
60 ms warm). `warm_up(engine)` runs those steps on the engine's own model runner before the
worker reports ready.

Triton compiles one binary per set of constexpr values and, for every integer argument, per
class of its value: 1, a multiple of 16, or neither (pointer alignment counts too, but does not
change between steps here). The integers that change from step to step, and so the steps
planned (`plan_warmup`):

- chunked-prefill attention, every step with a query longer than one token: its tile config,
  chosen from the step's token count (triton_prefill.default_prefill_config), the number of
  query tiles of the longest query, and the block-table width (blocks of the longest
  sequence). For every token-count range that gets its own tile config, up to
  --max-num-batched-tokens, a step for each pair of tile-count class and width class that
  fits the limits ("prefill"); and the largest step the scheduler can build ("peak"): the
  allocator grows to it now.
- decode attention: the split count, chosen from the batch size, and the block-table width.
  CUDA-graph capture (common/engine/cuda_graphs.py) already ran every captured batch size;
  each graph is replayed once here ("graph"; a first replay uploads the graph), and the
  batch sizes that run eagerly (above the largest captured size, or every size without
  graphs) run once per split count and width class ("decode").
- the small-M matmul of at most 16 rows (decode batches, short prefills, the logits of at
  most 16 sampling rows): the row count; without graphs the decode steps run 1, 2 and 16 rows.
- one step mixing decodes with a prefill chunk, as a busy server runs them ("mixed").
- sampling: the rows of all steps take turns through every sampling path (greedy, a draw,
  top-k, top-p, both, min-p, a seed, penalties, logit bias, min_tokens, logprobs), and with
  --async-scheduling a decode step is launched ahead of its input tokens as the engine does.
- the structured-output bitmask kernel, with and without row indices.

RMSNorm, RoPE, SiLU-and-mul and the K/V write take the token count as their grid only.
Not covered: LoRA adapters' kernels (an adapter must be loaded to run them), the KV
connectors' own kernels and connections (a peer is known only when its first transfer
comes), and grammar compilation (per schema, on the CPU).

The warm-up leaves no trace: its requests never enter the scheduler (the steps go to the
model runner directly, so no request id of theirs can meet a client's), it writes only into
KV blocks that are free and hold no cached prefix, it samples with a sampler of its own (the
engine's random generator is where it was), and the block pool, the prefix cache, the KV
events and the step and token counters are not touched.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from common.engine.block_pool import NULL_BLOCK_ID
from common.engine.request import Request
from common.engine.sampler import Sampler
from common.engine.scheduled_batch import ScheduledBatch
from common.sampling_params import SamplingParams

if TYPE_CHECKING:
    from common.engine.llm_engine import LLMEngine
    from common.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# Query tokens per tile where no Triton kernel chooses one (the plain-torch backend): the
# plan then still runs each integer class of the step's sizes.
GENERIC_TOKENS_PER_TILE = 16
# Decode rows of the mixed step, and the prefill chunk beside them.
MIXED_DECODE_ROWS = 4
MIXED_CHUNK_TOKENS = 64


@dataclass(frozen=True)
class Row:
    """One request of a planned step: `query` new tokens after `context` tokens already in
    the cache (a cached prefix, earlier chunks, a decode's past); it samples the next token."""

    context: int
    query: int

    @property
    def length(self) -> int:
        return self.context + self.query


@dataclass(frozen=True)
class WarmupStep:
    kind: str  # prefill, peak, mixed, graph or decode (the module docstring says what each is for)
    rows: tuple[Row, ...]

    @property
    def num_tokens(self) -> int:
        return sum(row.query for row in self.rows)

    @property
    def max_query(self) -> int:
        return max(row.query for row in self.rows)

    @property
    def max_length(self) -> int:
        return max(row.length for row in self.rows)


@dataclass(frozen=True)
class StepLimits:
    """What bounds the steps serving can schedule, and so the planned ones."""

    max_num_batched_tokens: int
    max_num_seqs: int
    max_row_tokens: int  # --max-model-len, or less when the warm-up has fewer free blocks
    block_size: int
    graph_sizes: tuple[int, ...] = ()  # captured decode batch sizes; () runs every decode eagerly


class KernelChoices(Protocol):
    """What the attention kernels choose from a step's sizes."""

    def prefill_tiling(self, num_tokens: int) -> tuple[Hashable, int]:
        """(the tile config a step of `num_tokens` tokens launches prefill attention with,
        query tokens per tile)."""
        ...

    def decode_splits(self, batch_size: int) -> Hashable:
        """What decode attention's launch depends on at this batch size (its split count)."""
        ...


@dataclass
class WarmupReport:
    steps: list[WarmupStep]
    seconds: float
    kernel_variants: int | None  # Triton kernel variants first run (compiled or loaded); None: not counted

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for step in self.steps:
            kinds[step.kind] = kinds.get(step.kind, 0) + 1
        parts = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
        variants = "" if self.kernel_variants is None else f"; {self.kernel_variants} Triton kernel variants"
        return f"warm-up: {len(self.steps)} steps ({parts}) in {self.seconds:.1f} s{variants}"


# -- the plan ----------------------------------------------------------------------------


def plan_warmup(limits: StepLimits, kernels: KernelChoices) -> list[WarmupStep]:
    """The steps to run: each within the limits, one for each kernel variant they reach."""
    steps = _prefill_steps(limits, kernels)
    steps.append(_peak_step(limits))
    if limits.max_num_seqs >= 2 and limits.max_num_batched_tokens >= 3:
        steps.append(_mixed_step(limits))
    steps += [_decode_step("graph", size, 1, limits) for size in limits.graph_sizes]
    steps += _eager_decode_steps(limits, kernels)
    return steps


def _int_class(n: int) -> int:
    """Triton's specialization of an integer argument: 1, 16 (a multiple of 16) or 0 (neither)."""
    return 1 if n == 1 else 16 if n % 16 == 0 else 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _prefill_steps(limits: StepLimits, kernels: KernelChoices) -> list[WarmupStep]:
    bs = limits.block_size
    steps, seen = [], set()
    for low, high, config, tile in _tiling_ranges(limits.max_num_batched_tokens, kernels):
        # a longest query of 1 tile, 2 tiles (neither 1 nor 16) and 16 tiles, of at least 2
        # tokens (one-token queries make a decode step): the longest such query (fewest rows),
        # and one within a block, whose sequence may take a one-block table
        for tiles in (1, 2, 16):
            shortest, longest = max(2, (tiles - 1) * tile + 1), tiles * tile
            top = min(limits.max_row_tokens, high)
            queries = sorted({q for q in (longest, min(longest, bs)) if shortest <= q <= top}, reverse=True)
            for query, width in [(q, w) for q in queries for w in _widths(_cdiv(q, bs), limits)]:
                key = (config, _int_class(tiles), _int_class(width))
                if key in seen:
                    continue
                step = _prefill_step(max(low, query), query, width, limits)
                if step is not None:
                    seen.add(key)
                    steps.append(step)
    return steps


def _tiling_ranges(max_tokens: int, kernels: KernelChoices) -> Iterator[tuple[int, int, Hashable, int]]:
    """(first, last token count, config, tokens per tile) of each run of prefill token counts
    in [2, max_tokens] that launch with one tile config. Probed along a ladder of counts, each
    change found exactly by bisection (a config changes at most once between ladder points)."""
    if max_tokens < 2:
        return
    ladder = sorted({2, max_tokens, *(n for n in _geometric(2, max_tokens))})
    start, (config, tile) = 2, kernels.prefill_tiling(2)
    for previous, current in itertools.pairwise(ladder):
        if kernels.prefill_tiling(current)[0] == config:
            continue
        low, high = previous, current  # config at low, another at high
        while high - low > 1:
            middle = (low + high) // 2
            if kernels.prefill_tiling(middle)[0] == config:
                low = middle
            else:
                high = middle
        yield start, low, config, tile
        start, (config, tile) = high, kernels.prefill_tiling(high)
    yield start, max_tokens, config, tile


def _geometric(low: int, high: int) -> Iterator[int]:
    n = low
    while n < high:
        yield n
        n = max(n + 1, n * 5 // 4)


def _widths(min_width: int, limits: StepLimits) -> list[int]:
    """A block-table width of each integer class, the smallest at least `min_width` blocks
    that a row of at most max_row_tokens holds."""
    widest = limits.max_row_tokens // limits.block_size
    candidates = [1] if min_width == 1 else []
    candidates.append(_cdiv(min_width, 16) * 16)
    candidates.append(min_width if _int_class(min_width) == 0 else max(2, min_width + 1))
    return sorted({w for w in candidates if min_width <= w and (w == min_width or w <= widest)})


def _prefill_step(num_tokens: int, query: int, width: int, limits: StepLimits) -> WarmupStep | None:
    """`num_tokens` tokens whose longest query is `query` tokens in a sequence of `width`
    blocks: that row, then rows of at most `query` fresh tokens; None when it cannot fit."""
    if num_tokens > limits.max_num_batched_tokens:
        return None
    length = min(width * limits.block_size, limits.max_row_tokens)
    if _cdiv(length, limits.block_size) != width:
        return None
    rows = [Row(length - query, query)]
    left = num_tokens - query
    while left > 0:
        rows.append(Row(0, min(query, left)))
        left -= rows[-1].query
    if len(rows) > limits.max_num_seqs:
        return None
    return WarmupStep("prefill", tuple(rows))


def _peak_step(limits: StepLimits) -> WarmupStep:
    """As many tokens as a step may hold, in rows as long as a sequence may be."""
    longest = limits.max_row_tokens
    budget = min(limits.max_num_batched_tokens, longest * limits.max_num_seqs)
    rows = [Row(0, longest)] * (budget // longest)
    if budget % longest:
        rows.append(Row(0, budget % longest))
    return WarmupStep("peak", tuple(rows))


def _mixed_step(limits: StepLimits) -> WarmupStep:
    decodes = min(MIXED_DECODE_ROWS, limits.max_num_seqs - 1, limits.max_num_batched_tokens - 2)
    context = min(2 * limits.block_size, limits.max_row_tokens) - 1
    chunk = min(MIXED_CHUNK_TOKENS, limits.max_row_tokens, limits.max_num_batched_tokens - decodes)
    return WarmupStep("mixed", (*[Row(context, 1)] * decodes, Row(0, chunk)))


def _decode_step(kind: str, batch_size: int, width: int, limits: StepLimits) -> WarmupStep:
    length = min(width * limits.block_size, limits.max_row_tokens)
    return WarmupStep(kind, (Row(length - 1, 1),) * batch_size)


def _eager_decode_steps(limits: StepLimits, kernels: KernelChoices) -> list[WarmupStep]:
    """Decode batch sizes that run eagerly: the first size of each split count, 1, 2 and 16
    rows (the small-M matmul's classes) and the largest, each at every width class."""
    low = max(limits.graph_sizes, default=0) + 1
    high = min(limits.max_num_seqs, limits.max_num_batched_tokens)
    if low > high:
        return []
    sizes, splits = {high} | {n for n in (1, 2, 16) if low <= n <= high}, set()
    for n in range(low, high + 1):
        split = kernels.decode_splits(n)
        if split not in splits:
            splits.add(split)
            sizes.add(n)
    return [_decode_step("decode", n, width, limits) for n in sorted(sizes) for width in _widths(1, limits)]


# -- running it -------------------------------------------------------------------------


def sampling_paths(vocab_size: int, max_logprobs: int) -> tuple[SamplingParams, ...]:
    """One SamplingParams of each path through the sampler (common/engine/sampler.py)."""
    draw = 0.8
    return (
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=draw),
        SamplingParams(temperature=draw, top_k=min(20, vocab_size)),
        SamplingParams(temperature=draw, top_p=0.9),
        SamplingParams(temperature=draw, top_k=min(20, vocab_size), top_p=0.9),
        SamplingParams(temperature=draw, min_p=0.05),
        SamplingParams(temperature=draw, seed=0),
        SamplingParams(temperature=0.0, repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.5),
        SamplingParams(temperature=0.0, logit_bias={0: 1.0}),
        SamplingParams(temperature=0.0, min_tokens=1),
        SamplingParams(temperature=0.0, logprobs=min(5, max_logprobs)),
    )


class EngineKernels:
    """KernelChoices of an engine's model runner: the Triton attention backend's own choices,
    or generic ones for the plain-torch backend (CPU)."""

    def __init__(self, runner: ModelRunner, num_attention_heads: int, num_key_value_heads: int) -> None:
        self._backend = getattr(runner.model, "attn_backend", None)
        self._triton = getattr(self._backend, "name", None) == "triton"
        self._device = runner.device
        self._num_kv_heads = runner.kv_cache.shape[3]  # this rank's heads
        self._head_dim = runner.kv_cache.shape[5]
        self._group = num_attention_heads // num_key_value_heads

    def prefill_tiling(self, num_tokens: int) -> tuple[Hashable, int]:
        if not self._triton:
            return None, GENERIC_TOKENS_PER_TILE
        from common.attention.triton_paged_tiles import next_power_of_2
        from common.attention.triton_prefill import default_prefill_config

        config = default_prefill_config(
            self._head_dim, self._group, self._num_kv_heads, num_tokens, self._device
        )
        block_m = max(config.block_m, next_power_of_2(self._group))  # as prefill_attention launches it
        return config, block_m // self._group

    def decode_splits(self, batch_size: int) -> Hashable:
        if not self._triton:
            return None
        return self._backend.decode_splits(batch_size, self._num_kv_heads, self._device)


def warm_up(engine: LLMEngine) -> WarmupReport:
    """Run the planned steps on `engine`'s model runner (module docstring). The engine must be
    idle: nothing scheduled, no step launched."""
    if engine.has_unfinished_requests():
        raise RuntimeError("warm_up runs on an idle engine (before it serves), not between its steps")
    runner, config = engine.runner, engine.config
    scratch = _scratch_blocks(engine)
    limits = StepLimits(
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.max_num_seqs,
        max_row_tokens=min(config.max_model_len, len(scratch) * config.block_size),
        block_size=config.block_size,
        graph_sizes=tuple(runner.cuda_graphs.sizes) if runner.cuda_graphs is not None else (),
    )
    if limits.max_row_tokens < 2:
        raise RuntimeError("the KV cache has no free block to warm up with; warm up before serving")
    model_config = engine.model_config
    kernels = EngineKernels(runner, model_config.num_attention_heads, model_config.num_key_value_heads)
    steps = plan_warmup(limits, kernels)
    counter = KernelFirstUses() if runner.device.type == "cuda" else None
    start = time.perf_counter()
    engine_sampler, runner.sampler = runner.sampler, Sampler(config.seed)
    try:
        if counter is not None:
            counter.install()
        _Steps(engine, scratch).run(steps)
    finally:
        runner.sampler = engine_sampler
        if counter is not None:
            counter.uninstall()
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    counted = counter.count if counter is not None and counter.available else None
    return WarmupReport(steps, time.perf_counter() - start, counted)


def _scratch_blocks(engine: LLMEngine) -> list[int]:
    """Blocks the warm-up may write: free ones that hold no cached prefix (nothing reads them
    before a request that gets one writes it)."""
    pool = engine.block_pool
    return [
        b.block_id
        for b in pool.blocks
        if b.block_id != NULL_BLOCK_ID and pool.is_free(b) and b.block_hash is None
    ]


class _Steps:
    """Planned steps as ScheduledBatches of throwaway requests, run on the engine's runner."""

    def __init__(self, engine: LLMEngine, scratch: list[int]) -> None:
        self.engine = engine
        self.runner = engine.runner
        self.scratch = scratch
        self.block_size = engine.config.block_size
        self.paths = sampling_paths(engine.vocab_size, engine.max_logprobs)
        self._turn = 0  # the next sampling path a row takes
        self._count = 0

    def run(self, steps: Sequence[WarmupStep]) -> None:
        for step in steps:
            self.runner.execute(self.batch(step.rows))
        config = self.engine.config
        room = min(config.max_model_len, len(self.scratch) * self.block_size)
        if self.engine.async_scheduling and self.block_size + 2 <= room:  # two tokens past a block
            self._launch_ahead(min(config.max_num_seqs, 4))
        self._bitmask()

    def batch(self, rows: Sequence[Row], paths: Sequence[SamplingParams] = ()) -> ScheduledBatch:
        """Each row a new request, sampling with `paths` in turn (by default the next paths
        of the rotation), its block table the first scratch blocks."""
        requests, tables = [], []
        for row in rows:
            params = paths[len(requests) % len(paths)] if paths else self._next_path()
            requests.append(self._request(row, params))
            tables.append(self._table(row.length))
        return ScheduledBatch(requests, [row.query for row in rows], tables)

    def _table(self, num_tokens: int) -> list[int]:
        return self.scratch[: _cdiv(num_tokens, self.block_size)]

    def _next_path(self) -> SamplingParams:
        params = self.paths[self._turn % len(self.paths)]
        self._turn += 1
        return params

    def _request(self, row: Row, params: SamplingParams) -> Request:
        self._count += 1
        vocab = self.engine.vocab_size
        tokens = [(self._count + 7 * i) % vocab for i in range(row.length)]
        request = Request(f"warmup-{self._count}", tokens, params, eos_token_id=self.engine.eos_token_id)
        request.num_computed_tokens = row.context
        return request

    def _launch_ahead(self, batch_size: int) -> None:
        """A decode step launched without waiting for its tokens, and the step after it
        launched ahead of them (fed on the device), as the engine runs --async-scheduling."""
        rows = (Row(self.block_size - 1, 1),) * batch_size
        paths = (SamplingParams(temperature=0.0), SamplingParams(temperature=0.8))
        first = self.batch(rows, paths=paths)
        handle = self.runner.launch(first)
        # the same requests, one token further: the token `first` samples is their input
        tables = [self._table(row.length + 1) for row in rows]
        following = ScheduledBatch(first.requests, [1] * batch_size, tables, ahead=True)
        self.runner.launch(following, feed=handle).result()
        handle.result()

    def _bitmask(self) -> None:
        """The structured-output bitmask on every row, and on some rows (row indices)."""
        from common.structured_output.apply_bitmask import apply_token_bitmask_
        from common.structured_output.matcher import allocate_bitmask

        vocab = self.engine.vocab_size
        logits = torch.zeros(2, vocab, dtype=torch.float32, device=self.runner.device)
        bitmask = allocate_bitmask(2, vocab)
        apply_token_bitmask_(logits, bitmask)
        apply_token_bitmask_(logits, bitmask[:1], torch.tensor([1]))


# -- Triton kernel variants run for the first time ------------------------------------------


class KernelFirstUses:
    """Counts the Triton kernel variants this process runs for the first time while installed
    (each compiled, or loaded from the kernel cache folder); with `log_each`, logs each one.
    Triton calls the hook only when a variant is not in its in-process cache, so it costs
    nothing on the steps that follow."""

    def __init__(self, log_each: bool = False) -> None:
        self.log_each = log_each
        self.count = 0
        self.available = False  # whether this Triton calls the hook (install() found its knob)
        self._previous: Any = None

    def install(self) -> bool:
        """False where this Triton has no jit_cache_hook knob (or no Triton)."""
        runtime = _triton_runtime_knobs()
        if runtime is None:
            return False
        self._previous = runtime.jit_cache_hook
        runtime.jit_cache_hook = self
        self.available = True
        return True

    def uninstall(self) -> None:
        runtime = _triton_runtime_knobs()
        if runtime is not None and runtime.jit_cache_hook is self:
            runtime.jit_cache_hook = self._previous

    def __call__(self, **kwargs: Any) -> Any:
        """Triton's jit_cache_hook: called with the variant about to be compiled or loaded."""
        self.count += 1
        if self.log_each:
            fn = kwargs.get("fn")
            logger.warning(
                "Triton kernel %s ran for the first time while serving (compiled, or loaded from "
                "the kernel cache): the warm-up did not run this shape, and the step that met it "
                "waited. Kernel variant: %s",
                getattr(fn, "name", "?"),
                kwargs.get("repr", "?"),
            )
        # a true value would tell Triton to skip compiling
        return self._previous(**kwargs) if self._previous is not None else None


def _triton_runtime_knobs() -> Any:
    try:
        import triton
    except ImportError:
        return None
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    return runtime if runtime is not None and hasattr(runtime, "jit_cache_hook") else None


def log_kernel_compiles_while_serving() -> KernelFirstUses:
    """From now on, log every Triton kernel variant this process runs for the first time: once
    the warm-up has run, each one is a shape it missed, and a request that waited for it."""
    watcher = KernelFirstUses(log_each=True)
    watcher.install()
    return watcher
