"""The prefill worker's Role: it exports KV blocks (kv_role kv_producer, or kv_both) and
attaches only the producer's hooks (producer.py), even with kv_both: routers send a
prefill worker no request with kv_transfer_params.
"""

from __future__ import annotations

from common.protocol import WorkerRole
from common.worker.role import Role
from kvtransfer.factory import WORKER_CONNECTORS
from prefill_worker.producer import ProducerHooks

PREFILL_ROLE = Role(
    name=WorkerRole.PREFILL,
    kv_roles=("kv_producer", "kv_both"),
    connectors=WORKER_CONNECTORS,
    build_hooks=ProducerHooks.for_engine,
)
