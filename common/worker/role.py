"""What makes a worker a prefill or a decode worker: its Role.

A worker process is the serving loop both roles share (engine_server.py, started by
run_worker.py) plus one Role: the role's name, the kv_role values it accepts, how it
builds its KV connector, and the KV-transfer hooks it attaches to the engine, which
carry the role's policy. The prefill and decode packages each define one Role; since
common imports neither them nor the connectors, everything role-specific comes in
through it. Torch-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.config.kv_transfer_config import KVTransferConfig
from common.kv_connector import KVConnector, WorkerConnectors
from common.protocol import WorkerRole

if TYPE_CHECKING:
    from common.engine.kv_transfer_hooks import KVTransferHooks
    from common.engine.llm_engine import LLMEngine


@dataclass(frozen=True)
class Role:
    name: WorkerRole  # in load reports, registry records, metrics and logs
    kv_roles: tuple[str, ...]  # the kv_role values this worker accepts; the first is its default
    connectors: WorkerConnectors  # the default connector's name, and how to build one
    # (the engine, its connector) -> the role's hooks, attached with the connector
    build_hooks: Callable[[LLMEngine, KVConnector], KVTransferHooks]


def kv_transfer_config_for(config: KVTransferConfig | None, role: Role) -> KVTransferConfig:
    """--kv-transfer-config completed for `role`: the default connector and kv_role where
    the flag leaves them out; ValueError for a kv_role this worker cannot play."""
    if config is None:
        return KVTransferConfig(kv_connector=role.connectors.default_name(), kv_role=role.kv_roles[0])
    if config.kv_role is not None and config.kv_role not in role.kv_roles:
        raise ValueError(
            f"--kv-transfer-config kv_role {config.kv_role!r} does not fit a {role.name.value} worker; "
            f"use {' or '.join(role.kv_roles)}"
        )
    config = dataclasses.replace(
        config,
        kv_connector=config.kv_connector or role.connectors.default_name(),
        kv_role=config.kv_role or role.kv_roles[0],
    )
    config.validate()
    return config
