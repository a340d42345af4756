"""Request traces in Mooncake's format, as `pdserve bench route` and `prefix-index` replay
them: one JSON object a line,

    {"timestamp": 40, "input_length": 23769, "output_length": 3, "hash_ids": [151, 152, ...]}

`timestamp` is the arrival in milliseconds, `hash_ids` name the prompt's blocks of
`TRACE_BLOCK_SIZE` tokens (the last one may be partial); equal ids are equal prefix
blocks, so an id already names its whole prefix, as a chained block hash does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

TRACE_BLOCK_SIZE = 512  # tokens per hash id in Mooncake's traces


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def load_trace(path: str, limit: int | None = None) -> list[TraceRequest]:
    """The first `limit` requests of a Mooncake-format JSONL trace (all when None), in
    arrival order. A malformed line is a ValueError naming the line."""
    requests: list[TraceRequest] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if limit is not None and len(requests) >= limit:
                break
            if not line.strip():
                continue
            requests.append(_parse(line, f"{path}:{line_no}"))
    requests.sort(key=lambda r: r.arrival_s)  # stable: equal timestamps keep file order
    return requests


def _parse(line: str, where: str) -> TraceRequest:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not JSON ({exc.msg}); each line must be one JSON object") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("timestamp", "input_length", "output_length", "hash_ids") if k not in row]
    if missing:
        raise ValueError(f"{where}: missing {missing}; a Mooncake trace line has timestamp (ms), "
                         "input_length, output_length and hash_ids")  # fmt: skip
    timestamp, hash_ids = row["timestamp"], row["hash_ids"]
    input_length, output_length = row["input_length"], row["output_length"]
    if not _is_number(timestamp) or timestamp < 0:
        raise ValueError(f"{where}: timestamp must be a number of ms, 0 or more, got {timestamp!r}")
    for name, value in (("input_length", input_length), ("output_length", output_length)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    if not isinstance(hash_ids, list) or not all(_is_int(h) for h in hash_ids):
        raise ValueError(f"{where}: hash_ids must be a list of ints")
    return TraceRequest(timestamp / 1000.0, input_length, output_length, tuple(hash_ids))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return _is_int(value) or isinstance(value, float)


def distinct_blocks(trace: list[TraceRequest]) -> int:
    return len({h for r in trace for h in r.hash_ids})
