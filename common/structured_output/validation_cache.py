"""The router's verdicts on structured-output specs, remembered: a bounded LRU of which
specs the grammar engine accepts and why it refuses the others.

Checking a spec builds its grammar (validate.validate_spec), which costs far more than
looking it up; many requests share a handful of schemas, so each distinct spec is checked
once and its verdict (accepted, or the refusal's message) reused. Entries are keyed by a
digest of the spec's cache_key, so a client's megabyte schema costs a few dozen bytes here
however many of them it sends. Requests are prepared on several threads at once; a lock
guards the entries, not the check, so two threads may check one new spec twice, never
wrongly. Torch-free.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from common.structured_output.spec import StructuredOutputSpec
from common.structured_output.validate import validate_spec

DEFAULT_CAPACITY = 1024


class ValidationCache:
    """At most `capacity` verdicts, least recently used evicted first."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"validation cache capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._verdicts: OrderedDict[tuple, str | None] = OrderedDict()  # None: accepted
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._verdicts)

    def check(self, spec: StructuredOutputSpec) -> None:
        """Return when the grammar engine accepts `spec`; ValueError naming the problem otherwise."""
        key = _key(spec)
        with self._lock:
            found = key in self._verdicts
            if found:
                self.hits += 1
                self._verdicts.move_to_end(key)
                verdict = self._verdicts[key]
            else:
                self.misses += 1
        if not found:
            verdict = _verdict(spec)
            with self._lock:
                self._verdicts[key] = verdict
                self._verdicts.move_to_end(key)
                while len(self._verdicts) > self.capacity:
                    self._verdicts.popitem(last=False)
        if verdict is not None:
            raise ValueError(verdict)


def _key(spec: StructuredOutputSpec) -> tuple:
    kind, text, *switches = spec.cache_key
    return (kind, hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest(), *switches)


def _verdict(spec: StructuredOutputSpec) -> str | None:
    try:
        validate_spec(spec)
    except ValueError as exc:
        return str(exc)
    return None


_shared = ValidationCache()


def check_spec(spec: StructuredOutputSpec) -> None:
    """`ValidationCache.check` on the process's one cache."""
    _shared.check(spec)


def shared_cache() -> ValidationCache:
    """The process's one cache (its hit and miss counts)."""
    return _shared
