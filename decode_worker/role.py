"""The decode worker's part: it pulls KV blocks (kv_role kv_consumer, or kv_both).

A request with kv_transfer_params waits, with its blocks allocated, while the connector
pulls the prompt blocks its own prefix cache lacks; the running sequences keep decoding
meanwhile (continuous batching). A request without them is prefilled here. A failed
pull is recomputed here or fails, as kv_load_failure_policy says.
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


DECODE_ROLE = WorkerRole(
    name="decode",
    kv_roles=("kv_consumer", "kv_both"),
    default_connector=default_connector_name,
    build_connector=build_connector,
)
