"""Which grammar engine constrains decoding, chosen by measurement: llguidance against
xgrammar on this CPU, for the embedded SmolLM2 tokenizer (49,152 tokens) and a 128k one.

Per engine and vocabulary it reports
- mask time per token: fill one sequence's bitmask after each token of a valid JSON
  document (the document tokenized, then fed token by token): the mean for the first
  sequence of a compiled grammar, and mean, p50, p99 for a later one (llguidance builds
  lexer state lazily and shares it between a grammar's matchers);
- the same for a batch of 64 sequences at different points of their documents;
- compile time: spec text to a matcher whose first mask is filled, median and max over
  the cases below (caches off);
- support: of ~30 JSON schemas plus regex, choice and EBNF/Lark/GBNF grammars, how many
  compile and give valid output under a masked walk over random logits (checked with
  jsonschema, re.fullmatch, membership).

No Llama-3 tokenizer is on these machines, so the 128k vocabulary is synthetic: the
SmolLM2 BPE plus generated merges of a word token and a lower-case piece, up to
128,256 ids.

    pdserve bench grammar [--engines llguidance,xgrammar] [--vocabs 49k,128k]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pdserve.bench.table import format_table

_STR = {"type": "string"}
_INT = {"type": "integer"}
_NUM = {"type": "number"}
_BOOL = {"type": "boolean"}


def _obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        **extra,
    }


_ADDRESS = _obj({"street": _STR, "city": _STR, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})
SCHEMAS: dict[str, dict[str, Any]] = {
    "flat object": _obj({"name": _STR, "age": _INT, "active": _BOOL}),
    "optional props": _obj({"id": _INT, "nick": _STR, "score": _NUM}, required=["id"]),
    "nested object": _obj({"user": _obj({"name": _STR, "address": _ADDRESS})}),
    "array of strings": _obj({"tags": {"type": "array", "items": _STR}}),
    "array minItems/maxItems": _obj({"xs": {"type": "array", "items": _INT, "minItems": 2, "maxItems": 4}}),
    "array of objects": _obj(
        {"items": {"type": "array", "items": _obj({"sku": _STR, "qty": _INT}), "maxItems": 3}}
    ),
    "string enum": _obj({"color": {"enum": ["red", "green", "blue"]}}),
    "mixed enum": _obj({"v": {"enum": ["a", 1, None, True]}}),
    "const": _obj({"kind": {"const": "event"}, "n": _INT}),
    "anyOf": _obj({"value": {"anyOf": [_INT, _STR, {"type": "null"}]}}),
    "oneOf objects": _obj({"shape": {"oneOf": [_obj({"r": _NUM}), _obj({"w": _NUM, "h": _NUM})]}}),
    "nullable type list": _obj({"maybe": {"type": ["string", "null"]}}),
    "format date-time": _obj({"at": {"type": "string", "format": "date-time"}}),
    "format date": _obj({"day": {"type": "string", "format": "date"}}),
    "format email": _obj({"mail": {"type": "string", "format": "email"}}),
    "format uuid": _obj({"id": {"type": "string", "format": "uuid"}}),
    "format ipv4": _obj({"ip": {"type": "string", "format": "ipv4"}}),
    "pattern": _obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}}),
    "string length": _obj({"s": {"type": "string", "minLength": 3, "maxLength": 8}}),
    "integer bounds": _obj({"n": {"type": "integer", "minimum": -5, "maximum": 500}}),
    "number exclusive bounds": _obj({"x": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}}),
    "additionalProperties false": _obj({"a": _STR, "b": _INT}, additionalProperties=False),
    "additionalProperties schema": {"type": "object", "additionalProperties": _INT, "maxProperties": 3},
    "$ref/$defs": {
        "$defs": {"point": _obj({"x": _NUM, "y": _NUM})},
        **_obj({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}}),
    },
    "recursive $ref": {
        "$defs": {
            "node": _obj(
                {"v": _INT, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}}
            )
        },
        "$ref": "#/$defs/node",
    },
    "allOf": {"allOf": [_obj({"a": _INT}), _obj({"b": _STR})]},
    "top-level array": {"type": "array", "items": _obj({"k": _STR}), "minItems": 1, "maxItems": 3},
    "tool call": _obj(
        {"name": {"const": "get_weather"}, "arguments": _obj({"city": _STR, "unit": {"enum": ["c", "f"]}})}
    ),
    "uniqueItems": _obj({"u": {"type": "array", "items": _INT, "uniqueItems": True, "maxItems": 3}}),
    "if/then": {"type": "object", "if": _obj({"a": _INT}), "then": _obj({"b": _INT})},
    "patternProperties": {
        "type": "object",
        "patternProperties": {"^x_": _INT},
        "additionalProperties": False,
    },
}
# (kind, text, check): the non-JSON cases.
OTHER_CASES: dict[str, tuple[str, str]] = {
    "json_object": ("json_object", ""),
    "regex phone": ("regex", r"\(\d{3}\) \d{3}-\d{4}"),
    "regex email-like": ("regex", r"[a-z]{1,10}@[a-z]{1,10}\.(com|org)"),
    "choice": ("choice", json.dumps(["positive", "negative", "neutral"])),
    "lark grammar": (
        "lark",
        'start: expr\nexpr: NUMBER | "(" expr OP expr ")"\nOP: "+" | "*"\nNUMBER: /[0-9]{1,3}/',
    ),
    "gbnf grammar": ("gbnf", 'root ::= "yes" | "no" | "maybe " num\nnum ::= [0-9] [0-9]?'),
}
# (schema name, instance): documents fed token by token for the mask-time figures.
MASK_DOCS = [
    (
        "nested object",
        {
            "user": {
                "name": "Ada Lovelace",
                "address": {"street": "12 Analytical Row", "city": "London", "zip": "10001"},
            }
        },
    ),
    (
        "array of objects",
        {"items": [{"sku": "A-100", "qty": 2}, {"sku": "B-7", "qty": 11}, {"sku": "C-3", "qty": 1}]},
    ),
    ("tool call", {"name": "get_weather", "arguments": {"city": "San Francisco", "unit": "f"}}),
    ("format date-time", {"at": "2024-05-06T07:08:09Z"}),
]


class Guidance:
    """llguidance through common/structured_output, as the engine uses it."""

    name = "llguidance"

    def __init__(self, tokenizer: Any) -> None:
        from common.structured_output.grammar_cache import GrammarTokenizer

        self.tokenizer = GrammarTokenizer.from_tokenizer(tokenizer)

    def compile(self, kind: str, text: str) -> Any:
        from common.structured_output.grammar_cache import compile_grammar
        from common.structured_output.spec import StructuredOutputSpec

        kind = "grammar" if kind in ("lark", "gbnf") else kind
        return compile_grammar(StructuredOutputSpec(kind, text), self.tokenizer)  # type: ignore[arg-type]

    def matcher(self, compiled: Any) -> Any:
        from common.structured_output.matcher import GrammarMatcher

        m = GrammarMatcher(compiled)
        return m.fill_bitmask, m.accept_token, m.is_terminated, m

    def fill_batch(self, matchers: list[Any], bitmask: Any) -> None:
        from common.structured_output.matcher import fill_bitmasks

        fill_bitmasks([(m[3], i) for i, m in enumerate(matchers)], bitmask)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: Any) -> None:
        import transformers
        import xgrammar

        self.xgr = xgrammar
        hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
        info = xgrammar.TokenizerInfo.from_huggingface(
            hf, vocab_size=tokenizer.vocab_size, stop_token_ids=list(tokenizer.eos_token_ids)
        )
        self.info = info
        self.batch = xgrammar.BatchGrammarMatcher()

    def compile(self, kind: str, text: str) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        if kind == "json":
            compiled = compiler.compile_json_schema(text, any_whitespace=True)
        elif kind == "json_object":
            compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=True)  # as vLLM does
        elif kind == "regex":
            compiled = compiler.compile_regex(text)
        elif kind == "choice":  # as vLLM's xgrammar backend does
            compiled = compiler.compile_grammar(
                "root ::= " + " | ".join(json.dumps(c) for c in json.loads(text))
            )
        elif kind == "lark":
            compiled = compiler.compile_lark(text)
        else:
            compiled = compiler.compile_grammar(text)
        return compiled

    def matcher(self, compiled: Any) -> Any:
        m = self.xgr.GrammarMatcher(compiled)
        return (lambda bm, row=0: m.fill_next_token_bitmask(bm, row)), m.accept_token, m.is_terminated, m

    def fill_batch(self, matchers: list[Any], bitmask: Any) -> None:
        self.batch.batch_fill_next_token_bitmask([m[3] for m in matchers], bitmask)


ENGINES: dict[str, Callable[[Any], Any]] = {"llguidance": Guidance, "xgrammar": XGrammar}


def synthetic_tokenizer(base: Any, size: int, seed: int = 0) -> Any:
    """`base` (byte-level BPE) grown to `size` ids by merges of two existing tokens."""
    import tokenizers

    from common.tokenizer.tokenizer import Tokenizer

    data = json.loads(base.backend.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    merges: list = data["model"]["merges"]
    # Words and word pieces, as a larger real vocabulary mostly adds.
    heads = [t for t in vocab if re.fullmatch("Ġ?[A-Za-z]+", t)]
    tails = [t for t in vocab if re.fullmatch("[a-z]+", t)]
    rng = random.Random(seed)
    next_id = max(vocab.values()) + 1
    while next_id < size:
        a, b = rng.choice(heads), rng.choice(tails)
        if a + b in vocab or len(a + b) > 16:
            continue
        vocab[a + b] = next_id
        merges.append([a, b] if merges and isinstance(merges[0], list) else f"{a} {b}")
        next_id += 1
    backend = tokenizers.Tokenizer.from_str(json.dumps(data))
    return Tokenizer(backend, base.special_tokens, base.chat_templates, base.eos_token_ids)


def walk_bias(tokenizer: Any) -> Any:
    """Per-token bias that steers a random walk to finish: closers up, blank tokens down."""
    import torch

    bias = torch.zeros(tokenizer.vocab_size)
    for i in range(tokenizer.vocab_size):
        text = tokenizer.decode([i], skip_special_tokens=False)
        if text and not text.strip():
            bias[i] = -3.0  # free whitespace would otherwise go on for ever
        elif "," in text or ":" in text:
            continue  # opens another item or key: neither closes nor keeps away from closing
        elif '"' in text:
            bias[i] = 3.0
        elif "@" in text:  # an e-mail's local part may hold closers but must reach "@"
            bias[i] = 2.5
        elif any(c in text for c in "}])"):
            bias[i] = 2.0
    bias[list(tokenizer.eos_token_ids)] = 5.0
    return bias


def walk(engine: Any, compiled: Any, tokenizer: Any, bias: Any, rng: Any, max_steps: int) -> list[int] | None:
    """Greedy over random logits plus a growing pull to finish, masked by the grammar;
    None when it has not finished in max_steps."""
    import torch

    from common.structured_output.apply_bitmask import apply_token_bitmask_
    from common.structured_output.matcher import allocate_bitmask

    fill, accept, terminated, _ = engine.matcher(compiled)
    bitmask = allocate_bitmask(1, tokenizer.vocab_size)
    out: list[int] = []
    eos = set(tokenizer.eos_token_ids)
    for step in range(max_steps):
        fill(bitmask, 0)
        logits = torch.rand(1, tokenizer.vocab_size, generator=rng) + bias * min(1.0, step / 16)
        apply_token_bitmask_(logits, bitmask)
        token = int(logits.argmax())
        if not accept(token):
            raise RuntimeError(f"{engine.name} refused token {token} that its own mask allowed")
        if token in eos or terminated():
            return out + ([] if token in eos else [token])
        out.append(token)
    return None


def _format_checker() -> Any:
    import jsonschema

    checker = jsonschema.FormatChecker()

    @checker.checks("date-time", raises=ValueError)
    def _date_time(value: object) -> bool:
        # RFC 3339: jsonschema checks it only with an optional package installed.
        if not isinstance(value, str):
            return True
        if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value, re.IGNORECASE):
            raise ValueError(f"not an RFC 3339 date-time: {value!r}")
        # A leap second (:60) is valid RFC 3339 that datetime cannot hold.
        datetime.fromisoformat(re.sub(r":60(?=[.Z+-]|$)", ":59", value.upper().replace("Z", "+00:00")))
        return True

    return checker


def check_output(kind: str, text: str, output: str) -> str | None:
    """None when `output` satisfies the case, else what is wrong."""
    if kind in ("json", "json_object"):
        import jsonschema

        try:
            value = json.loads(output)
        except json.JSONDecodeError as exc:
            return f"not JSON: {exc}"
        schema = json.loads(text) if kind == "json" else {"type": "object"}
        try:
            jsonschema.validate(value, schema, format_checker=_format_checker())
        except jsonschema.ValidationError as exc:
            return f"invalid: {exc.message}"
        return None
    if kind == "regex":
        return None if re.fullmatch(text, output) else f"{output!r} does not match"
    if kind == "choice":
        return None if output in json.loads(text) else f"{output!r} is not a choice"
    return None  # grammars: the matcher reached its end, which is the check


def _cases() -> list[tuple[str, str, str]]:
    return [(n, "json", json.dumps(s)) for n, s in SCHEMAS.items()] + [
        (n, *c) for n, c in OTHER_CASES.items()
    ]


def measure(engine: Any, tokenizer: Any, bias: Any, max_steps: int, seed: int) -> dict[str, Any]:
    import torch

    from common.structured_output.matcher import allocate_bitmask

    compile_ms, support, failures = [], 0, []
    rng = torch.Generator().manual_seed(seed)
    for name, kind, text in _cases():
        start = time.perf_counter()
        try:
            compiled = engine.compile(kind, text)
            fill, *_ = engine.matcher(compiled)
            fill(allocate_bitmask(1, tokenizer.vocab_size), 0)
        except Exception as exc:  # an engine's refusal is the figure here
            failures.append(f"{name}: compile error: {str(exc).splitlines()[0][:100]}")
            continue
        compile_ms.append((time.perf_counter() - start) * 1e3)
        out = walk(engine, compiled, tokenizer, bias, rng, max_steps)
        problem = "no end" if out is None else check_output(kind, text, tokenizer.decode(out))
        if problem is None:
            support += 1
        else:
            failures.append(f"{name}: {problem[:100]}")

    first_seq, per_token, batch_ms = [], [], []
    for schema_name, instance in MASK_DOCS:
        compiled = engine.compile("json", json.dumps(SCHEMAS[schema_name]))
        ids = tokenizer.encode(json.dumps(instance), add_special_tokens=False) + [tokenizer.eos_token_ids[0]]
        bitmask = allocate_bitmask(1, tokenizer.vocab_size)
        # The first sequence of a compiled grammar may build engine state that later ones share.
        for times in (first_seq, per_token):
            fill, accept, _, _ = engine.matcher(compiled)
            for token in ids:
                start = time.perf_counter_ns()
                fill(bitmask, 0)
                times.append((time.perf_counter_ns() - start) / 1e3)
                if not accept(token):
                    raise RuntimeError(
                        f"{engine.name} refused token {token} of a valid {schema_name} document"
                    )
        # 64 sequences of this schema, each at its own point of the document.
        matchers = [engine.matcher(compiled) for _ in range(64)]
        for i, m in enumerate(matchers):
            for token in ids[: i % (len(ids) - 1)]:
                m[1](token)
        batch = allocate_bitmask(64, tokenizer.vocab_size)
        for _ in range(5):
            start = time.perf_counter_ns()
            engine.fill_batch(matchers, batch)
            batch_ms.append((time.perf_counter_ns() - start) / 1e6)
    per_token.sort()
    return {
        "first_us_mean": statistics.fmean(first_seq),
        "mask_us_mean": statistics.fmean(per_token),
        "mask_us_p50": per_token[len(per_token) // 2],
        "mask_us_p99": per_token[int(0.99 * (len(per_token) - 1))],
        "batch64_ms": statistics.median(batch_ms),
        "compile_ms_median": statistics.median(compile_ms) if compile_ms else float("nan"),
        "compile_ms_max": max(compile_ms) if compile_ms else float("nan"),
        "support": support,
        "cases": len(_cases()),
        "failures": failures,
    }


def add_grammar_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engines", default="llguidance,xgrammar", help="comma-separated: llguidance, xgrammar"
    )
    parser.add_argument("--vocabs", default="49k,128k", help="49k (SmolLM2's), 128k (synthetic, 128,256 ids)")
    parser.add_argument(
        "--max-steps", type=int, default=384, help="tokens a walk may take before it counts as no end"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of the random logits of the support walks and of the synthetic 128k vocabulary.",
    )


def run_grammar_bench(args: argparse.Namespace) -> int:
    import torch

    from common.model_files import embedded_default_model
    from common.tokenizer.tokenizer import load_tokenizer

    torch.set_num_threads(min(2, torch.get_num_threads()))
    base = load_tokenizer(embedded_default_model())
    vocabs = {"49k": lambda: base, "128k": lambda: synthetic_tokenizer(base, 128_256, args.seed)}
    print(f"CPU: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    rows = []
    for vocab_name in args.vocabs.split(","):
        tokenizer = vocabs[vocab_name]()
        bias = walk_bias(tokenizer)
        for engine_name in args.engines.split(","):
            try:
                engine = ENGINES[engine_name](tokenizer)
            except ImportError as exc:
                print(f"{engine_name}: not installed ({exc}); skipped")
                continue
            r = measure(engine, tokenizer, bias, args.max_steps, args.seed)
            rows.append(
                [
                    engine_name,
                    f"{tokenizer.vocab_size:,}",
                    f"{r['first_us_mean']:.0f}",
                    f"{r['mask_us_mean']:.0f}",
                    f"{r['mask_us_p50']:.0f}",
                    f"{r['mask_us_p99']:.0f}",
                    f"{r['batch64_ms']:.2f}",
                    f"{r['compile_ms_median']:.1f}",
                    f"{r['compile_ms_max']:.1f}",
                    f"{r['support']}/{r['cases']}",
                ]
            )
            for failure in r["failures"]:
                print(f"  {engine_name} {vocab_name}: {failure}")
    header = [
        "engine",
        "vocab",
        "mask µs/token: 1st seq mean",
        "later mean",
        "p50",
        "p99",
        "batch-64 mask ms",
        "compile ms median",
        "max",
        "supported",
    ]
    print(format_table(header, rows, "lrrrrrrrrr"))
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0
