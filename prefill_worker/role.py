"""The prefill worker's part: it exports KV blocks (kv_role kv_producer, or kv_both).

Its requests arrive with prefill_only set: the engine computes the prompt (chunked,
mixed with other prompts), samples the first token, and leases the request's blocks to
the decode worker through the connector until it pulls them or the lease
(kv_connector_extra_config.kv_lease_duration, 30 s) runs out.
"""

from __future__ import annotations

from common.worker.worker_role import WorkerRole
from kvtransfer.factory import default_connector_name
from kvtransfer.tp_connector import build_worker_connector

PREFILL_ROLE = WorkerRole(
    name="prefill",
    kv_roles=("kv_producer", "kv_both"),
    default_connector=default_connector_name,
    build_connector=build_worker_connector,
)
