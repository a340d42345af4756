"""Which adapter a request runs under: its name, the folder it loads from, and its id.

The router gives every adapter it serves a positive id (vLLM's lora_int_id, published as
KV events' `lora_id`) and sends (name, path, id) with each request; the name and path
enter every block hash of the request as the extra key ("lora", name, path), as vLLM 0.33
hashes them, so prefix caching never mixes adapters and a router recomputes the hashes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_NAME_CHARS = 256
MAX_PATH_CHARS = 4096


@dataclass(frozen=True)
class LoRARequest:
    name: str
    path: str
    id: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not 0 < len(self.name) <= MAX_NAME_CHARS:
            raise ValueError(f"a LoRA adapter's name must be a string of 1 to {MAX_NAME_CHARS} characters")
        if not isinstance(self.path, str) or not 0 < len(self.path) <= MAX_PATH_CHARS:
            raise ValueError(
                f"LoRA adapter {self.name!r}: its path must be a string of 1 to {MAX_PATH_CHARS} characters"
            )
        if isinstance(self.id, bool) or not isinstance(self.id, int) or self.id < 1:
            raise ValueError(f"LoRA adapter {self.name!r}: its id must be a positive int, got {self.id!r}")

    @property
    def hash_key(self) -> tuple[str, str]:
        """(name, path): what the block hashes' ("lora", name, path) extra key holds."""
        return (self.name, self.path)

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "id": self.id}

    @classmethod
    def from_wire(cls, data: Any) -> LoRARequest:
        """From the map of to_wire(); ValueError saying what is wrong."""
        if not isinstance(data, dict) or set(data) != {"name", "path", "id"}:
            raise ValueError("lora must be a map with exactly the keys name, path and id")
        return cls(data["name"], data["path"], data["id"])
