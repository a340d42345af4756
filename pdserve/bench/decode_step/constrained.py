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


def time_constrained(bench: Any, batch_sizes: list[int], tokenizer_path: str | None) -> list[dict[str, Any]]:
    """Per batch size: the median engine step free and constrained, and the CPU time of
    filling the batch's masks alone."""
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
    return rows


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
