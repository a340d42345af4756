"""The decode worker's part: it pulls KV blocks (kv_role kv_consumer, or kv_both).

A request with kv_transfer_params waits, with its blocks allocated, while the connector
pulls the prompt blocks its own prefix cache lacks; the running sequences keep decoding
meanwhile (continuous batching). A request without them is prefilled here. A failed
pull is recomputed here or fails, as kv_load_failure_policy says.
"""

from __future__ import annotations

from common.worker.worker_role import WorkerRole
from kvtransfer.factory import default_connector_name
from kvtransfer.tp_connector import build_worker_connector

DECODE_ROLE = WorkerRole(
    name="decode",
    kv_roles=("kv_consumer", "kv_both"),
    default_connector=default_connector_name,
    build_connector=build_worker_connector,
)
