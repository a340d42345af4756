"""What rank 0 tells the other ranks each step: a msgpack map, never pickle.

A step carries the packed inputs the model runner built (token ids, positions, cache
slots, lengths, block tables, the rows that sample) as raw little-endian integer arrays,
and the few scalars attention needs; every rank then runs the same forward. "shutdown"
ends a rank's loop.

A service message (a msgpack array ["service", target, args], where a step is a map)
asks every rank to start a helper that runs beside its steps, such as a KV connector of
its own: `target` names "module:function", `args` is a map of plain values.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

STEP = "step"
SHUTDOWN = "shutdown"
SERVICE = "service"
_DTYPES = {"int32": np.dtype("<i4"), "int64": np.dtype("<i8")}


def encode_step(arrays: dict[str, np.ndarray], scalars: dict[str, int]) -> bytes:
    return msgpack.packb(
        {
            "op": STEP,
            "scalars": scalars,
            "arrays": {
                name: [a.dtype.name, a.astype(_DTYPES[a.dtype.name], copy=False).tobytes()]
                for name, a in arrays.items()
            },
        }
    )


def encode_service(target: str, args: dict[str, Any]) -> bytes:
    return msgpack.packb([SERVICE, target, args])


def is_service(message: bytes) -> bool:
    """Whether `message` is a service message (a 3-element msgpack array), not a step."""
    return message[:1] == b"\x93"


def decode_service(message: bytes) -> tuple[str, dict[str, Any]]:
    """(target, args) of a service message; ValueError naming what is malformed."""
    body: Any = msgpack.unpackb(message)
    if not (
        isinstance(body, list)
        and len(body) == 3
        and body[0] == SERVICE
        and isinstance(body[1], str)
        and ":" in body[1]
        and isinstance(body[2], dict)
    ):
        raise ValueError('a service message must be ["service", "module:function", {args}]')
    return body[1], body[2]


def encode_shutdown() -> bytes:
    return msgpack.packb({"op": SHUTDOWN})


def decode(message: bytes) -> tuple[str, dict[str, np.ndarray], dict[str, int]]:
    """(op, arrays, scalars); ValueError naming what is malformed."""
    body: Any = msgpack.unpackb(message)
    if not isinstance(body, dict) or body.get("op") not in (STEP, SHUTDOWN):
        raise ValueError(f"a tensor-parallel step message must be a map with op {STEP!r} or {SHUTDOWN!r}")
    if body["op"] == SHUTDOWN:
        return SHUTDOWN, {}, {}
    scalars, arrays = body.get("scalars"), body.get("arrays")
    if not isinstance(scalars, dict) or not all(isinstance(v, int) for v in scalars.values()):
        raise ValueError("a step message's scalars must be a map of integers")
    if not isinstance(arrays, dict):
        raise ValueError("a step message's arrays must be a map of [dtype, bytes]")
    decoded = {}
    for name, entry in arrays.items():
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and entry[0] in _DTYPES
            and isinstance(entry[1], bytes)
        ):
            raise ValueError(f"step array {name!r} must be [int32|int64, bytes]")
        dtype = _DTYPES[entry[0]]
        if len(entry[1]) % dtype.itemsize:
            raise ValueError(
                f"step array {name!r} has {len(entry[1])} bytes, not a whole number of {entry[0]}"
            )
        # bytearray: a writable buffer, which torch.from_numpy expects
        decoded[name] = np.frombuffer(bytearray(entry[1]), dtype=dtype)
    return STEP, decoded, scalars
