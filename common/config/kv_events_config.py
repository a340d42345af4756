"""`--kv-events-config`: whether and where a worker publishes its KV-cache events.

vLLM's fields and defaults (see specs/kv-events.md), checked when the command line is parsed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from common.config.field_checks import check_choice, check_int, check_known_fields, check_str

KV_EVENT_PUBLISHERS = ("zmq", "null")
_ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")


@dataclass
class KVEventsConfig:
    enable_kv_cache_events: bool = False
    publisher: str | None = None  # None: "zmq" when events are enabled, else "null"
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10000
    hwm: int = 100000
    max_queue_size: int = 100000
    topic: str = ""

    def __post_init__(self) -> None:
        if self.publisher is None:
            self.publisher = "zmq" if self.enable_kv_cache_events else "null"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVEventsConfig:
        """Check `data` (the JSON of --kv-events-config) and fill the defaults.

        Raises ValueError saying which field is wrong and what it may be.
        """
        check_known_fields(data, (f.name for f in fields(cls)))
        config = cls(**data)
        config.validate()
        return config

    def validate(self) -> None:
        if not isinstance(self.enable_kv_cache_events, bool):
            raise ValueError(
                f"enable_kv_cache_events must be true or false, got {self.enable_kv_cache_events!r}"
            )
        check_choice("publisher", self.publisher, KV_EVENT_PUBLISHERS)
        for name in ("endpoint", "replay_endpoint"):
            value = getattr(self, name)
            check_str(name, value, optional=name == "replay_endpoint")
            if value is not None and not value.startswith(_ENDPOINT_SCHEMES):
                raise ValueError(
                    f"{name} {value!r} must be a ZMQ address starting with "
                    f"{', '.join(_ENDPOINT_SCHEMES)}, e.g. tcp://*:5557"
                )
        check_int("buffer_steps", self.buffer_steps, 0)
        check_int("hwm", self.hwm, 0)
        check_int("max_queue_size", self.max_queue_size, 1)
        check_str("topic", self.topic)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
