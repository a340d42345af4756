"""The prefill worker's part: it exports KV blocks (kv_role kv_producer, or kv_both).

Its requests arrive with prefill_only set: the engine computes the prompt (chunked,
mixed with other prompts), samples the first token, and leases the request's blocks to
the decode worker through the connector until it pulls them or the lease
(kv_connector_extra_config.kv_lease_duration, 30 s) runs out.
"""

from __future__ import annotations

from typing import Any

from common.config.kv_transfer_config import KVTransferConfig
from common.worker.worker_role import WorkerRole
from kvtransfer.connector import ConnectorUnavailableError, KVConnector
from kvtransfer.factory import default_connector_name
from kvtransfer.kv_cache_spec import KVCacheSpec
from kvtransfer.tp_connector import create_engine_connector


def build_connector(config: KVTransferConfig, spec_fields: dict[str, Any], tp_size: int = 1) -> KVConnector:
    """The connector of an engine of `tp_size` ranks (one per rank above 1: kvtransfer/tp_connector.py)."""
    try:
        return create_engine_connector(config, config.kv_role, KVCacheSpec(**spec_fields), tp_size=tp_size)
    except ConnectorUnavailableError as e:
        raise ValueError(f"{e}; or name another kv_connector in --kv-transfer-config") from None


PREFILL_ROLE = WorkerRole(
    name="prefill",
    kv_roles=("kv_producer", "kv_both"),
    default_connector=default_connector_name,
    build_connector=build_connector,
)
