"""`pdserve bench decode-step --structured-outputs`: the engine's decode step with every
sequence under a JSON schema against the same step unconstrained.

Each sequence of the batch gets one of a few schemas of the grammar bench (an object, a
nested one, an array of objects, a date-time, a tool call) and a matcher compiled for the
model's vocabulary: the embedded tokenizer (or --grammar-tokenizer) grown to the model's
vocabulary size with the grammar bench's synthetic merges when the model's is larger. A
matcher that finishes its grammar starts it again, so every step is constrained. Times are
ModelRunner.execute's (as the engine-step column): the masks are filled on the CPU while
the GPU runs the forward, then applied on the device before sampling.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from pdserve.bench.grammar import SCHEMAS
from pdserve.bench.table import format_table

SCHEMA_NAMES = ("flat object", "nested object", "array of objects", "format date-time", "tool call")


def grammar_tokenizer(path: str | None, vocab_size: int) -> Any:
    """The grammar engine's view of --grammar-tokenizer (default: the embedded model's),
    grown to `vocab_size` ids when it has fewer."""
    from common.model_files import embedded_default_model
    from common.structured_output.grammar_cache import GrammarTokenizer
    from common.tokenizer.tokenizer import load_tokenizer
    from pdserve.bench.grammar import synthetic_tokenizer

    base = load_tokenizer(embedded_default_model()) if path is None else load_tokenizer(None, path)  # type: ignore[arg-type]
    if base.vocab_size < vocab_size:
        base = synthetic_tokenizer(base, vocab_size)
    return GrammarTokenizer.from_tokenizer(base, vocab_size)


def time_constrained(bench: Any, batch_sizes: list[int], tokenizer_path: str | None) -> dict[str, Any]:
    """Per batch size: the median runner step free and constrained, and the CPU time of
    filling the batch's masks alone ("data"); then the whole engine at the largest batch
    with none, half or all of it constrained ("engine")."""
    import torch

    from common.structured_output.grammar_cache import GrammarCache
    from common.structured_output.matcher import GrammarMatcher, allocate_bitmask, fill_bitmasks
    from common.structured_output.spec import StructuredOutputSpec

    vocab_size = bench.model_config.vocab_size
    started = time.perf_counter()
    tokenizer = grammar_tokenizer(tokenizer_path, vocab_size)
    cache = GrammarCache()
    compiled = [
        cache.get(StructuredOutputSpec("json", json.dumps(SCHEMAS[n])), tokenizer) for n in SCHEMA_NAMES
    ]
    print(
        f"grammar tokenizer and {len(compiled)} schemas ready in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    rows = []
    for b in batch_sizes:
        free_ms = bench.time_engine_steps(bench.batch(b))
        batch = bench.batch(b)
        for i, request in enumerate(batch.requests):
            request.grammar = GrammarMatcher(compiled[i % len(compiled)])
        constrained_ms = bench.time_engine_steps(batch, restart_grammars=True)
        bitmask = allocate_bitmask(b, vocab_size)
        matchers = [(r.grammar, i) for i, r in enumerate(batch.requests)]
        mask_times = []
        for _ in range(20):
            start = time.perf_counter()
            fill_bitmasks(matchers, bitmask)
            mask_times.append((time.perf_counter() - start) * 1e3)
        rows.append(
            {
                "batch": b,
                "free_ms": free_ms,
                "constrained_ms": constrained_ms,
                "ratio": constrained_ms / free_ms,
                "mask_fill_ms": statistics.median(mask_times),
                "vocab_size": vocab_size,
                "cpu_threads": torch.get_num_threads(),
            }
        )
        print(
            f"B={b}: engine step {free_ms:.3f} ms free, {constrained_ms:.3f} ms constrained "
            f"({constrained_ms / free_ms:.3f}x); masks alone {rows[-1]['mask_fill_ms']:.3f} ms on the CPU",
            flush=True,
        )
    if bench.device.type == "cuda":
        rows[-1].update(time_mask_apply(max(batch_sizes), vocab_size, bench.device, bench.args.rep_ms))
    engine = time_engine_async(
        bench.model, bench.model_config, max(batch_sizes), bench.context, bench.args.engine_steps, tokenizer
    )
    return {"data": rows, "engine": engine}


def time_mask_apply(batch_size: int, vocab_size: int, device: Any, rep_ms: float) -> dict[str, float]:
    """The device time of applying a full batch's bitmask to fp32 logits: the Triton kernel
    and the torch path (its reference)."""
    import torch

    from common.structured_output import apply_bitmask
    from pdserve.bench.decode_step.step_bench import time_ms

    logits = torch.randn(batch_size, vocab_size, device=device)
    bitmask = torch.randint(
        -(2**31), 2**31 - 1, (batch_size, (vocab_size + 31) // 32), dtype=torch.int32, device=device
    )
    figures = {}
    for name, use_kernel in (("apply_kernel_ms", True), ("apply_torch_ms", False)):
        apply_bitmask.USE_TRITON_KERNEL = use_kernel
        try:
            figures[name] = time_ms(
                lambda: apply_bitmask.apply_token_bitmask_(logits, bitmask), device, rep_ms
            )
        finally:
            apply_bitmask.USE_TRITON_KERNEL = True
    print(
        f"B={batch_size}: bitmask applied on the device in {figures['apply_kernel_ms'] * 1e3:.1f} us "
        f"(one kernel), {figures['apply_torch_ms'] * 1e3:.1f} us (torch ops)",
        flush=True,
    )
    return figures


def constrained_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "batch",
        "engine step free (ms)",
        "every sequence under a JSON schema (ms)",
        "ratio",
        "mask fill, CPU (ms)",
    ]
    cells = [
        [
            str(r["batch"]),
            f"{r['free_ms']:.3f}",
            f"{r['constrained_ms']:.3f}",
            f"{r['ratio']:.3f}x",
            f"{r['mask_fill_ms']:.3f}",
        ]
        for r in rows
    ]
    vocab = rows[0]["vocab_size"] if rows else 0
    return (
        f"structured outputs: schemas {', '.join(SCHEMA_NAMES)} round-robin over the batch; "
        f"vocabulary {vocab:,} ids\n\n" + format_table(header, cells, "r" * len(header))
    )


# A schema whose one string must be long: no sequence ends its grammar inside the timed steps.
LONG_TEXT = {
    "type": "object",
    "properties": {"text": {"type": "string", "minLength": 2000}},
    "required": ["text"],
}


def time_engine_async(
    model: Any, model_config: Any, batch_size: int, context: int, steps: int, tokenizer: Any
) -> list[dict[str, Any]]:
    """The whole engine (LLMEngine.step, async scheduling on where graphs replay) in steady
    decode: `batch_size` requests with `context`-token prompts, none, half or all of them
    under LONG_TEXT; the mean step over `steps` steps after the prefills."""
    import torch

    from common.config.engine_config import EngineConfig
    from common.engine.llm_engine import LLMEngine
    from common.sampling_params import SamplingParams
    from common.structured_output.spec import StructuredOutputSpec

    device = next(model.parameters()).device
    block_size = 16
    per_seq = -(-(context + steps + 64) // block_size)
    config = EngineConfig(
        device=device.type,
        max_model_len=context + steps + 64,
        max_num_seqs=batch_size,
        max_num_batched_tokens=max(8192, context),
        num_gpu_blocks_override=1 + batch_size * per_seq,
        block_size=block_size,
        enable_prefix_caching=False,
    )
    engine = LLMEngine.from_config(config, model=model, model_config=model_config)
    engine.structured_outputs.use_tokenizer(tokenizer)  # a dummy model has no tokenizer of its own
    spec = StructuredOutputSpec("json", json.dumps(LONG_TEXT))
    generator = torch.Generator().manual_seed(0)
    rows = []
    for share in (0.0, 0.5, 1.0):
        constrained = round(batch_size * share)
        for i in range(batch_size):
            prompt = torch.randint(0, model_config.vocab_size, (context,), generator=generator).tolist()
            params = SamplingParams(max_tokens=steps + 32, temperature=0.0, ignore_eos=True)
            if i < constrained:
                params.structured_outputs = spec
            engine.add_request(f"{share}-{i}", prompt, params)
        while engine.scheduler.waiting or any(r.num_output_tokens < 2 for r in engine.scheduler.running):
            engine.step()
        ahead_before = engine.num_steps_ahead
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        mean_ms = (time.perf_counter() - start) * 1e3 / steps
        rows.append(
            {
                "batch": batch_size,
                "constrained": constrained,
                "step_ms": mean_ms,
                "async_scheduling": engine.async_scheduling,
                "steps_ahead": engine.num_steps_ahead - ahead_before,
            }
        )
        print(
            f"engine B={batch_size}, {constrained} constrained: {mean_ms:.3f} ms a step "
            f"({rows[-1]['steps_ahead']} of {steps} launched ahead)",
            flush=True,
        )
        engine.abort_request(list(engine.scheduler.requests))
        while engine.has_unfinished_requests():
            engine.step()
    engine.shutdown()
    return rows


def engine_table(rows: list[dict[str, Any]]) -> str:
    header = ["batch", "constrained sequences", "engine step (ms)", "vs none", "steps launched ahead"]
    base = {r["batch"]: r["step_ms"] for r in rows if r["constrained"] == 0}
    cells = [
        [
            str(r["batch"]),
            str(r["constrained"]),
            f"{r['step_ms']:.3f}",
            f"{r['step_ms'] / base[r['batch']]:.3f}x",
            str(r["steps_ahead"]),
        ]
        for r in rows
    ]
    return (
        "whole engine (LLMEngine.step, async scheduling "
        f"{'on' if rows and rows[0]['async_scheduling'] else 'off'}), steady decode, "
        "constrained sequences under a 2,000-character string schema\n\n"
        + format_table(header, cells, "r" * len(header))
    )
