"""How a prefill worker lives: the producer's policy, as KV-transfer hooks of the engine.

1. Intake. Routers send it prompts with prefill_only set (`pdserve prefill` refuses
   nothing else of the kind: a request with kv_transfer_params is a decode worker's).
   The engine runs them like any other, chunked and mixed with the other prompts.
2. The first token. When a prefill_only request samples its first token, the scheduler
   takes it out of the batch and keeps its blocks held (FINISHED_REMOTE_DECODE). If
   that token already ends the request (EOS, a stop token, max_tokens 1), it finishes
   normally instead and its blocks are freed at once; the router then skips decode.
3. Export. `on_first_token` leases the blocks that hold the prompt's KV to a future
   consumer through the connector (`export_blocks`), and the params it returns travel
   in the finished output (`kv_transfer_params`) back to the router, which hands them
   to a decode worker. A connector that refuses the export fails the request: nothing
   is leased, so its blocks are freed here.
4. Free on notice or expiry. The connector's lease table (kvtransfer) frees a lease when
   the consumer says it is done (after its pull, on a full local hit, on abort) or when
   kv_connector_extra_config.kv_lease_duration (30 s) runs out; at the start of every
   step `on_step_start` frees the blocks of every request the connector lets go.
"""

from __future__ import annotations

from common.engine.kv_transfer_hooks import KVTransferHooks
from common.engine.llm_engine import LLMEngine
from common.engine.outputs import RequestOutput
from common.engine.remote_kv_states import KVPull, KVRelease
from common.engine.request import Request
from common.engine.scheduler import Scheduler
from common.kv_connector import KVConnector


class ProducerHooks(KVTransferHooks):
    """The prefill worker's hooks: export after the first token, free when let go."""

    def __init__(self, connector: KVConnector, scheduler: Scheduler) -> None:
        if not connector.is_producer:
            raise ValueError(
                "a prefill worker exports KV blocks: its --kv-transfer-config kv_role must be "
                "kv_producer or kv_both"
            )
        self.connector = connector
        self.scheduler = scheduler

    @classmethod
    def for_engine(cls, engine: LLMEngine, connector: KVConnector) -> ProducerHooks:
        return cls(connector, engine.scheduler)

    def admit(self, request: Request) -> bool:
        return request.prefill_only

    def on_step_start(self) -> None:
        for request_id in self.connector.take_freed_requests():
            self.scheduler.free_held(request_id)

    def on_orders(self, pulls: list[KVPull], releases: list[KVRelease]) -> None:
        """A producer pulls nothing: transfer orders are a consumer's."""

    def on_first_token(self, request: Request, output: RequestOutput) -> None:
        """Lease the request's prompt blocks to its consumer; the params go in its output."""
        request_id = request.request_id
        num_tokens = request.num_computed_tokens
        num_blocks = -(-num_tokens // self.scheduler.kv.block_size)
        block_ids = self.scheduler.kv.get_block_ids(request_id)[:num_blocks]
        try:
            output.kv_transfer_params = self.connector.export_blocks(request_id, block_ids, num_tokens)
            if request.lora is not None:  # the KV is the adapter's: the consumer checks it runs the same one
                output.kv_transfer_params["lora_name"] = request.lora.name
        except Exception as e:  # the connector refused: nothing leased, so nothing to wait for
            self.scheduler.free_held(request_id)
            output.finish_reason = "abort"
            output.error = f"exporting the prompt's KV blocks failed: {type(e).__name__}: {e}"
