"""The decode worker's Role: it pulls KV blocks (kv_role kv_consumer, or kv_both) and
attaches only the consumer's hooks (consumer.py), even with kv_both: routers send a
decode worker no prefill_only request.
"""

from __future__ import annotations

from common.protocol import WorkerRole
from common.worker.role import Role
from decode_worker.consumer import ConsumerHooks
from kvtransfer.factory import WORKER_CONNECTORS

DECODE_ROLE = Role(
    name=WorkerRole.DECODE,
    kv_roles=("kv_consumer", "kv_both"),
    connectors=WORKER_CONNECTORS,
    build_hooks=ConsumerHooks.for_engine,
)
