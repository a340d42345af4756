"""What makes a worker a prefill or a decode worker: the KV-transfer side it plays.

prefill_worker and decode_worker each define one WorkerRole; everything else about a
worker is shared (run_worker.py). The role packages build the connector, since common
never imports kvtransfer. Torch-free.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.config.kv_transfer_config import KVTransferConfig


@dataclass(frozen=True)
class WorkerRole:
    name: str  # "prefill" | "decode": the role in load reports and metrics
    kv_roles: tuple[str, ...]  # the kv_role values this worker accepts; the first is its default
    # the name of the connector to use when --kv-transfer-config names none
    default_connector: Callable[[], str]
    # (the resolved KVTransferConfig, KVCacheSpec fields, tensor-parallel size) -> a kvtransfer connector
    build_connector: Callable[[KVTransferConfig, dict[str, Any], int], Any]


def kv_transfer_config_for(config: KVTransferConfig | None, role: WorkerRole) -> KVTransferConfig:
    """--kv-transfer-config completed for `role`: the default connector and kv_role where
    the flag leaves them out; ValueError for a kv_role this worker cannot play."""
    if config is None:
        return KVTransferConfig(kv_connector=role.default_connector(), kv_role=role.kv_roles[0])
    if config.kv_role is not None and config.kv_role not in role.kv_roles:
        raise ValueError(
            f"--kv-transfer-config kv_role {config.kv_role!r} does not fit a {role.name} worker; "
            f"use {' or '.join(role.kv_roles)}"
        )
    config = dataclasses.replace(
        config,
        kv_connector=config.kv_connector or role.default_connector(),
        kv_role=config.kv_role or role.kv_roles[0],
    )
    config.validate()
    return config
