"""`--kv-transfer-config`: how a worker moves KV-cache blocks to or from its peers.

vLLM's fields and defaults (see specs/kv-transfer-config.md), checked when the command
line is parsed so that a typo fails at start-up, not at the first transfer.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from common.config.field_checks import check_choice, check_int, check_known_fields, check_str

# The connectors pdserve ships; the connector factory maps these names to classes.
KNOWN_KV_CONNECTORS = ("NixlConnector", "TcpConnector", "MultiConnector", "CudaIpcConnector")
KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")
KV_LOAD_FAILURE_POLICIES = ("fail", "recompute")
KV_BUFFER_DEVICES = ("cuda", "cpu")


def _new_engine_id() -> str:
    return str(uuid.uuid4())


@dataclass
class KVTransferConfig:
    kv_connector: str | None = None
    engine_id: str = field(default_factory=_new_engine_id)
    kv_buffer_device: str | None = None  # None: the platform's device, resolved at start-up
    kv_buffer_size: float = 1e9
    kv_role: str | None = None
    kv_rank: int | None = None
    kv_parallel_size: int = 1
    kv_ip: str = "127.0.0.1"
    kv_port: int = 14579
    kv_connector_extra_config: dict[str, Any] = field(default_factory=dict)
    kv_connector_module_path: str | None = None
    kv_load_failure_policy: str = "fail"  # "fail" | "recompute"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVTransferConfig:
        """Check `data` (the JSON of --kv-transfer-config) and fill the defaults.

        Raises ValueError saying which field is wrong and what it may be.
        """
        check_known_fields(data, (f.name for f in fields(cls)))
        values = dict(data)
        if values.get("engine_id") is None:
            values.pop("engine_id", None)
        if values.get("kv_connector_extra_config") is None:
            values.pop("kv_connector_extra_config", None)
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        check_str("kv_connector", self.kv_connector, optional=True)
        check_str("engine_id", self.engine_id)
        if not self.engine_id:
            raise ValueError("engine_id must not be empty; leave it out to get a random one")
        check_choice("kv_role", self.kv_role, KV_ROLES, optional=True)
        check_choice("kv_buffer_device", self.kv_buffer_device, KV_BUFFER_DEVICES, optional=True)
        check_choice("kv_load_failure_policy", self.kv_load_failure_policy, KV_LOAD_FAILURE_POLICIES)
        if isinstance(self.kv_buffer_size, bool) or not isinstance(self.kv_buffer_size, int | float):
            raise ValueError(f"kv_buffer_size must be a number of bytes, got {self.kv_buffer_size!r}")
        if self.kv_buffer_size <= 0:
            raise ValueError(f"kv_buffer_size must be positive, got {self.kv_buffer_size}")
        check_int("kv_rank", self.kv_rank, 0, optional=True)
        check_int("kv_parallel_size", self.kv_parallel_size, 1)
        check_str("kv_ip", self.kv_ip)
        check_int("kv_port", self.kv_port, 0, 65535)
        check_str("kv_connector_module_path", self.kv_connector_module_path, optional=True)
        if not isinstance(self.kv_connector_extra_config, dict):
            raise ValueError(
                f"kv_connector_extra_config must be a JSON object, got {self.kv_connector_extra_config!r}"
            )
        if self.kv_connector is None:
            return
        if self.kv_role is None:
            raise ValueError(
                f"kv_connector {self.kv_connector} needs a kv_role: kv_producer (prefill), "
                "kv_consumer (decode) or kv_both"
            )
        if self.kv_connector not in KNOWN_KV_CONNECTORS and self.kv_connector_module_path is None:
            raise ValueError(
                f"unknown kv_connector {self.kv_connector!r}; known connectors: "
                f"{', '.join(KNOWN_KV_CONNECTORS)} (or set kv_connector_module_path to the "
                "module of an out-of-tree connector class)"
            )
        if self.kv_connector == "MultiConnector":
            self._validate_multi_connector()

    def _validate_multi_connector(self) -> None:
        connectors = self.kv_connector_extra_config.get("connectors")
        if not isinstance(connectors, list) or not connectors:
            raise ValueError(
                "MultiConnector needs kv_connector_extra_config.connectors: a non-empty list of "
                'connector configs tried in order, e.g. [{"kv_connector": "NixlConnector"}]'
            )
        for i, sub in enumerate(connectors):
            if not isinstance(sub, dict):
                raise ValueError(
                    f"kv_connector_extra_config.connectors[{i}] must be a JSON object, got {sub!r}"
                )
            try:
                KVTransferConfig.from_dict({"kv_role": self.kv_role, **sub})
            except ValueError as e:
                raise ValueError(f"kv_connector_extra_config.connectors[{i}]: {e}") from None

    @property
    def is_kv_producer(self) -> bool:
        return self.kv_connector is not None and self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_kv_consumer(self) -> bool:
        return self.kv_connector is not None and self.kv_role in ("kv_consumer", "kv_both")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
