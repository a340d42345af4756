"""The requests a benchmark sends: `--dataset-name` random, prefix_repetition, sharegpt
(a ShareGPT-style JSON file), trace (a Mooncake-style JSONL trace replayed on its
timestamps), or json / json-unique (structured outputs: each answer constrained to a JSON
schema, vLLM's structured-output benchmark datasets). Torch-free.

Every sample knows its prompt's token count as the server counts it and the output
length to ask for (`max_tokens`); a constrained one also carries its JSON schema.
"""

from __future__ import annotations

import copy
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.bench.serve.metrics import RequestResult
from pdserve.bench.serve.prompt_builder import PromptBuilder
from pdserve.bench.serve.text_tokenizer import TextTokenizer

DATASET_NAMES = ("random", "prefix_repetition", "sharegpt", "trace", "json", "json-unique")
JSON_DATASETS = ("json", "json-unique")
# the schemas of --dataset-name json when no --json-schema-path is given: {"what": a
# description for the prompt, "schema": ...}, each bounded (strings, arrays, closed objects)
# so that a complete answer fits in a few hundred tokens
BUILT_IN_SCHEMAS_PATH = Path(__file__).with_name("json_schemas.json")
# ShareGPT conversations kept, as vLLM's bench keeps them
_SHAREGPT_MIN_LEN = 4
_SHAREGPT_MAX_PROMPT_LEN = 1024
_SHAREGPT_MAX_TOTAL_LEN = 2048


@dataclass(frozen=True)
class SampleRequest:
    prompt: str
    prompt_len: int
    expected_output_len: int
    # trace replay: seconds after the start at which to send it (None: the request rate decides)
    send_at_s: float | None = None
    # json datasets: the schema the answer must follow (None: free text)
    json_schema: dict[str, Any] | None = None


def random_requests(
    builder: PromptBuilder,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    prefix_len: int = 0,
    seed: int = 0,
) -> list[SampleRequest]:
    """Prompts of random words, `prefix_len` tokens of them shared by all, then
    input_len ± range_ratio tokens of their own; outputs of output_len ± range_ratio."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio {range_ratio} must be in [0, 1)")
    rng = random.Random(seed)
    prefix = builder.sample_words(rng, prefix_len)
    requests = []
    for _ in range(num_prompts):
        own = _around(rng, input_len, range_ratio)
        text, count = builder.prompt(rng, prefix_len + own, prefix)
        requests.append(SampleRequest(text, count, max(_around(rng, output_len, range_ratio), 1)))
    return requests


def prefix_repetition_requests(
    builder: PromptBuilder,
    num_prompts: int,
    prefix_len: int,
    suffix_len: int,
    num_prefixes: int,
    output_len: int,
    seed: int = 0,
) -> list[SampleRequest]:
    """`num_prefixes` prefixes of `prefix_len` tokens, each shared by an equal share of the
    prompts, followed by `suffix_len` tokens of each prompt's own; shuffled."""
    if num_prefixes < 1:
        raise ValueError(f"--prefix-repetition-num-prefixes {num_prefixes} must be at least 1")
    rng = random.Random(seed)
    prefixes = [builder.sample_words(rng, prefix_len) for _ in range(num_prefixes)]
    requests = []
    for i in range(num_prompts):
        text, count = builder.prompt(rng, prefix_len + suffix_len, prefixes[i % num_prefixes])
        requests.append(SampleRequest(text, count, output_len))
    rng.shuffle(requests)
    return requests


def sharegpt_requests(
    path: str,
    tokenizer: TextTokenizer,
    add_special_tokens: bool,
    num_prompts: int,
    output_len: int | None = None,
    max_model_len: int | None = None,
    seed: int = 0,
) -> list[SampleRequest]:
    """The first two turns of conversations from a ShareGPT-style JSON file: a list of
    {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}
    (or turns of {"role", "content"}). The reply's token count is the output length
    unless `output_len` is given. Conversations too short or too long are left out, as
    vLLM leaves them out; if too few remain, they are used again."""
    conversations = _read_sharegpt(path)
    random.Random(seed).shuffle(conversations)
    requests: list[SampleRequest] = []
    for prompt, reply in conversations:
        if len(requests) == num_prompts:
            break
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens))
        reply_len = output_len if output_len is not None else len(tokenizer.encode(reply, False))
        too_short = prompt_len < _SHAREGPT_MIN_LEN or (output_len is None and reply_len < _SHAREGPT_MIN_LEN)
        too_long = prompt_len > _SHAREGPT_MAX_PROMPT_LEN or prompt_len + reply_len > _SHAREGPT_MAX_TOTAL_LEN
        if max_model_len is not None and prompt_len + reply_len > max_model_len:
            too_long = True
        if not (too_short or too_long):
            requests.append(SampleRequest(prompt, prompt_len, reply_len))
    if not requests:
        raise ValueError(
            f"--dataset-path {path}: no conversation has a prompt of {_SHAREGPT_MIN_LEN} to "
            f"{_SHAREGPT_MAX_PROMPT_LEN} tokens and a reply that fits; check the file"
        )
    if len(requests) < num_prompts:
        print(
            f"bench serve: {path} has {len(requests)} usable conversations; using them again "
            f"to make {num_prompts} requests",
            file=sys.stderr,
        )
        requests = [requests[i % len(requests)] for i in range(num_prompts)]
    return requests


def trace_requests(
    path: str,
    builder: PromptBuilder,
    num_prompts: int,
    block_size: int = 512,
    time_scale: float = 1.0,
    seed: int = 0,
) -> list[SampleRequest]:
    """The first `num_prompts` lines of a Mooncake-style trace, one JSON object a line:
    {"timestamp": ms, "input_length": tokens, "output_length": tokens, "hash_ids": [...]}.
    Block i of a prompt (its tokens i*block_size to (i+1)*block_size) is the same text in
    every prompt whose hash_ids[i] is the same, so prompts share prefixes as the trace
    says. Each is sent at its timestamp times `time_scale` after the first one's."""
    if time_scale < 0:
        raise ValueError(f"--trace-time-scale {time_scale} must not be negative")
    records = _read_trace(path, num_prompts)
    blocks: dict[int, list[str]] = {}
    start_ms = min(record["timestamp"] for record in records)
    requests = []
    for record in records:
        words: list[str] = []
        for hash_id in record["hash_ids"]:
            if hash_id not in blocks:
                blocks[hash_id] = builder.sample_words(random.Random(f"{seed}:{hash_id}"), block_size)
            words += blocks[hash_id]
        needed = builder.content_words(record["input_length"])
        if len(words) < needed:  # a trace with fewer hash_ids than its length needs
            words += builder.sample_words(random.Random(f"{seed}:tail:{len(requests)}"), needed - len(words))
        text, count = builder.fit(words[:needed], record["input_length"], random.Random(len(requests)))
        send_at = (record["timestamp"] - start_ms) / 1000.0 * time_scale
        requests.append(SampleRequest(text, count, max(record["output_length"], 1), send_at))
    return requests


def json_schema_requests(
    tokenizer: TextTokenizer,
    add_special_tokens: bool,
    num_prompts: int,
    output_len: int,
    schema_path: str | None = None,
    unique: bool = False,
    structured_ratio: float = 1.0,
    seed: int = 0,
) -> list[SampleRequest]:
    """Prompts that ask for a JSON object and show its schema, the schemas taken in turn
    from `schema_path` (a schema, or a list of them) or the built-in ones; a share
    `structured_ratio` of the requests (chosen at random) is constrained to its schema, the
    rest ask the same in free text. `unique` (json-unique) gives every request's schema an
    optional property of its own, so no two requests share a compiled grammar."""
    if not 0.0 <= structured_ratio <= 1.0:
        raise ValueError(f"--structured-output-ratio {structured_ratio} must be in [0, 1]")
    require_schema_checker()
    rng = random.Random(seed)
    examples = _read_schemas(schema_path) if schema_path else _built_in_schemas()
    constrained = set(rng.sample(range(num_prompts), round(num_prompts * structured_ratio)))
    requests = []
    for i in range(num_prompts):
        what, schema = examples[i % len(examples)]
        if unique:
            schema = copy.deepcopy(schema)
            schema.setdefault("properties", {})[f"__optional_field_{rng.getrandbits(64):016x}"] = {
                "type": "string",
                "description": "A field of this request alone, so that no two requests share a grammar",
            }
        prompt = (
            f"Generate an example of {what} as JSON. Answer with the JSON object alone; it must follow "
            f"this JSON schema: {json.dumps(schema)}"
        )
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens))
        requests.append(
            SampleRequest(prompt, prompt_len, output_len, json_schema=schema if i in constrained else None)
        )
    return requests


def require_schema_checker() -> None:
    """The json datasets check every answer with the jsonschema package: stop before the run
    if it is missing."""
    try:
        import jsonschema  # noqa: F401
    except ImportError:
        raise ValueError(
            "--dataset-name json and json-unique check every answer against its schema with the "
            "jsonschema package, which is not installed; pip install jsonschema"
        ) from None


def follows_schema(text: str, schema: dict[str, Any]) -> bool:
    """Whether `text` is one JSON value, whitespace around it aside, valid under `schema`
    (the formats the jsonschema package checks included)."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    validator = jsonschema.validators.validator_for(schema)
    return validator(schema, format_checker=validator.FORMAT_CHECKER).is_valid(value)


def check_structured_outputs(requests: Sequence[SampleRequest], results: Sequence[RequestResult]) -> None:
    """Set `follows_schema` on the result of every constrained request (a failed one does not)."""
    for request, result in zip(requests, results, strict=True):
        if request.json_schema is not None:
            result.follows_schema = result.success and follows_schema(
                result.generated_text, request.json_schema
            )


def _built_in_schemas() -> list[tuple[str, dict[str, Any]]]:
    entries = json.loads(BUILT_IN_SCHEMAS_PATH.read_text())
    return [(entry["what"], entry["schema"]) for entry in entries]


def _read_schemas(path: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--json-schema-path {path}: cannot read it as JSON ({exc})") from None
    schemas = data if isinstance(data, list) else [data]
    if not schemas or not all(isinstance(schema, dict) for schema in schemas):
        raise ValueError(
            f"--json-schema-path {path}: expected a JSON schema (an object) or a non-empty list of them"
        )
    import jsonschema

    for i, schema in enumerate(schemas):
        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = f"schema {i}" if isinstance(data, list) else "the schema"
            raise ValueError(
                f"--json-schema-path {path}: {where} is not a valid JSON schema ({exc.message})"
            ) from None
    return [(_schema_subject(schema), schema) for schema in schemas]


def _schema_subject(schema: dict[str, Any]) -> str:
    """What the prompt asks for: the schema's title or description, else "an object"."""
    for key in ("title", "description"):
        if isinstance(schema.get(key), str) and schema[key].strip():
            return f"a {schema[key].strip()}"
    return "an object"


def _around(rng: random.Random, length: int, range_ratio: float) -> int:
    return rng.randint(int(length * (1 - range_ratio)), int(length * (1 + range_ratio)))


def _read_sharegpt(path: str) -> list[tuple[str, str]]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--dataset-path {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, list):
        raise ValueError(
            f"--dataset-path {path}: expected a JSON list of conversations, got {type(data).__name__}"
        )
    pairs = []
    for entry in data:
        turns = entry.get("conversations", entry.get("conversation")) if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        texts = [_turn_text(turn) for turn in turns[:2]]
        if all(isinstance(text, str) for text in texts):
            pairs.append((texts[0], texts[1]))
    return pairs


def _turn_text(turn: Any) -> str | None:
    if not isinstance(turn, dict):
        return None
    return turn.get("value", turn.get("content"))


def _read_trace(path: str, num_prompts: int) -> list[dict[str, Any]]:
    records = []
    try:
        with open(path) as file:
            for number, line in enumerate(file, 1):
                if len(records) == num_prompts:
                    break
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    records.append(
                        {
                            "timestamp": float(record["timestamp"]),
                            "input_length": int(record["input_length"]),
                            "output_length": int(record["output_length"]),
                            "hash_ids": [int(h) for h in record.get("hash_ids", [])],
                        }
                    )
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                    raise ValueError(
                        f"--dataset-path {path} line {number}: expected a JSON object with timestamp (ms), "
                        f"input_length, output_length and hash_ids ({type(exc).__name__}: {exc})"
                    ) from None
    except OSError as exc:
        raise ValueError(f"--dataset-path {path}: cannot read it ({exc})") from None
    if not records:
        raise ValueError(f"--dataset-path {path}: the trace has no requests")
    return records
