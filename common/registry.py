"""The worker registry in Redis: what a worker writes about itself and how routers read it.

    --registry redis://HOST:PORT/DB          (workers and routers alike)

Each worker keeps one key, `pdserve:worker:<worker id>`, holding a JSON WorkerRecord,
with a TTL that its heartbeat renews (common/registry_heartbeat.py). A worker that
stops cleanly deletes its key; one that dies leaves it to expire. Every change of
membership (a key written where none was, a key deleted) is also announced on the
channel `pdserve:workers`, so routers (router/registry_watcher.py) add a new worker at
once instead of at their next poll. One Redis database is one deployment: give
different deployments different databases (the /DB of the URL).

The record is JSON, never pickle: Redis is shared infrastructure, and a router
validates every record it reads (`WorkerRecord.from_json`), skipping a bad one.
Torch-free, and the `redis` package is imported only by the code that talks to Redis.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from common.protocol import WorkerRole

KEY_PREFIX = "pdserve:worker:"
CHANNEL = "pdserve:workers"
DEFAULT_TTL_S = 10.0
# A heartbeat renews the key this many times per TTL, so one or two lost beats (a slow
# Redis, a long GC pause) do not expire a live worker.
BEATS_PER_TTL = 3
ROLES = tuple(role.value for role in WorkerRole)
_ADDRESS_SCHEMES = ("tcp://", "ipc://")
_REQUIRED = ("worker_id", "role", "address", "model", "engine_id", "ttl_s")


def check_registry_url(url: str) -> str:
    """`url` if it is a Redis URL a registry can use; ValueError saying how to write it."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"--registry {url!r} is not a Redis URL; write redis://HOST:PORT/DB "
            "(rediss:// for TLS, unix:///path/to/redis.sock for a local socket)"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(
            f"--registry {url!r} has no host; write redis://HOST:PORT/DB, e.g. redis://10.0.0.2:6379/0"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"--registry {url!r} has a bad port; write redis://HOST:PORT/DB") from None
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"--registry {url!r}: the database after the port must be a number, e.g. /0")
    return url


def redacted(url: str) -> str:
    """`url` with its password hidden, for logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def worker_key(worker_id: str) -> str:
    return KEY_PREFIX + worker_id


@dataclass
class WorkerRecord:
    """One worker as the registry knows it."""

    worker_id: str
    role: str  # a WorkerRole's value: "prefill" | "decode"
    address: str  # the ZMQ address routers connect to (never a wildcard host)
    model: str
    engine_id: str
    ttl_s: float  # how long the record lives without a heartbeat
    served_model_name: str = ""
    kv_events_endpoint: str | None = None
    kv_replay_endpoint: str | None = None
    tensor_parallel_size: int = 1
    metrics_port: int | None = None
    # the load at the last heartbeat (the router reads live load reports over ZMQ; this
    # is for whoever looks at the registry: operators, tools, a router choosing whom to add)
    load: dict[str, float] = field(default_factory=dict)
    started_at: float = 0.0  # wall clock, seconds
    heartbeat_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerRecord:
        """Read a record; ValueError saying which field is wrong."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"a worker record must be JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"a worker record must be a JSON object, got {type(data).__name__}")
        missing = [name for name in _REQUIRED if name not in data]
        if missing:
            raise ValueError(f"a worker record lacks {missing}")
        known = {f.name for f in fields(cls)}
        # a newer worker may add fields: ignore them rather than drop the worker
        record = cls(**{k: v for k, v in data.items() if k in known})
        record.check()
        return record

    def check(self) -> None:
        for name in ("worker_id", "address", "model", "engine_id", "served_model_name"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"worker record field {name} must be a string, got {getattr(self, name)!r}")
        if not self.worker_id:
            raise ValueError("worker record field worker_id must not be empty")
        if self.role not in ROLES:
            raise ValueError(f"worker record field role must be one of {ROLES}, got {self.role!r}")
        if not self.address.startswith(_ADDRESS_SCHEMES) or "*" in self.address:
            raise ValueError(
                f"worker record field address must be a ZMQ address to connect to (tcp://HOST:PORT), "
                f"got {self.address!r}"
            )
        if not _positive_number(self.ttl_s):
            raise ValueError(f"worker record field ttl_s must be a positive number, got {self.ttl_s!r}")
        for name in ("kv_events_endpoint", "kv_replay_endpoint"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"worker record field {name} must be a string or null, got {value!r}")
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"worker record field tensor_parallel_size must be a positive int, got {tp!r}")
        if not isinstance(self.load, dict) or not all(
            isinstance(k, str) and _number(v) for k, v in self.load.items()
        ):
            raise ValueError(f"worker record field load must map names to numbers, got {self.load!r}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _positive_number(value: Any) -> bool:
    return _number(value) and value > 0
