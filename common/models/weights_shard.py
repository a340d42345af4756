"""The slice of a full checkpoint tensor that one tensor-parallel rank loads."""

from __future__ import annotations

from typing import NamedTuple


class Shard(NamedTuple):
    """Rows (dim 0) or columns (dim 1) [start, stop) of a full tensor."""

    dim: int
    start: int
    stop: int
