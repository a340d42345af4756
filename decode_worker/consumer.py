"""How a decode worker lives: the consumer's policy, as KV-transfer hooks of the engine.

1. Admission. A request with kv_transfer_params names the prefill worker holding its
   prompt's KV and, in params["first_token_id"], the token it sampled. `admit` checks
   that token and makes it the request's first output (never sent again from here;
   max_tokens counts it). A request without kv_transfer_params is simply prefilled here:
   that is local prefill, which the router picks when the part of the prompt this worker
   lacks is below --local-prefill-threshold.
2. The remote-KV wait. The scheduler gives the request blocks for its prompt, reusing
   its own prefix-cache hits, and orders a `KVPull` of only the blocks it lacks; the
   request then waits (WAITING_FOR_REMOTE_KV) with its seat and its blocks, while the
   running sequences keep decoding. `on_orders` starts each pull on the connector and
   sends each `KVRelease` (a full local hit, an abort before admission, a first token
   that already ends the request) as notify_done, so the producer frees its blocks.
3. Joining the batch. At the start of every step `on_step_start` polls the connector;
   a landed pull joins its request to the continuous decode batch, whose next step
   computes the first token's KV and samples the second. The worker's
   pdserve:kv_pull_seconds times that whole path, from `start_pull` to the join.
4. Failure. A pull that fails, cannot start, or whose params do not fit the prompt is
   recomputed here from the local hits under kv_load_failure_policy "recompute", or
   fails the request under "fail" (vLLM's default): the router gets an error, never a
   hang.
"""

from __future__ import annotations

import time
from typing import Any

from common.config.field_checks import check_choice
from common.config.kv_transfer_config import KV_LOAD_FAILURE_POLICIES
from common.engine.kv_transfer_hooks import KVTransferHooks
from common.engine.llm_engine import LLMEngine
from common.engine.outputs import RequestOutput
from common.engine.remote_kv_states import KVPull, KVRelease
from common.engine.request import Request
from common.engine.scheduler import Scheduler
from common.kv_connector import KVConnector


class ConsumerHooks(KVTransferHooks):
    """The decode worker's hooks: admit with the first token, pull, join or recompute."""

    def __init__(
        self, connector: KVConnector, scheduler: Scheduler, *, vocab_size: int, kv_load_failure_policy: str
    ) -> None:
        if not connector.is_consumer:
            raise ValueError(
                "a decode worker pulls KV blocks: its --kv-transfer-config kv_role must be "
                "kv_consumer or kv_both"
            )
        # the config checked it already; hooks built by hand get the same check
        check_choice("kv_load_failure_policy", kv_load_failure_policy, KV_LOAD_FAILURE_POLICIES)
        self.connector = connector
        self.scheduler = scheduler
        self.vocab_size = vocab_size
        self.kv_load_failure_policy = kv_load_failure_policy

    @classmethod
    def for_engine(cls, engine: LLMEngine, connector: KVConnector) -> ConsumerHooks:
        transfer = engine.config.kv_transfer_config
        return cls(
            connector,
            engine.scheduler,
            vocab_size=engine.vocab_size,
            kv_load_failure_policy=transfer.kv_load_failure_policy if transfer is not None else "fail",
        )

    def admit(self, request: Request) -> bool:
        params = request.kv_transfer_params
        if params is None:
            return False
        produced_under = params.get("lora_name")
        runs_under = None if request.lora is None else request.lora.name
        if produced_under != runs_under:
            raise ValueError(
                f"kv_transfer_params: the prefill worker computed this prompt's KV under LoRA adapter "
                f"{produced_under!r}, but the request runs under {runs_under!r}; send both workers the same adapter"
            )
        request.append_output_token(first_token_id(params, self.vocab_size))
        return True

    def on_step_start(self) -> None:
        done, failed = self.connector.poll()
        for request_id in done:
            self.scheduler.finish_kv_pull(request_id)
        for request_id, reason in failed:
            self._pull_failed(request_id, reason)

    def on_orders(self, pulls: list[KVPull], releases: list[KVRelease]) -> None:
        for release in releases:
            self.connector.notify_done(release.request_id, release.params)
        for pull in pulls:
            reason = pull.error
            if reason is None:
                # pdserve:kv_pull_seconds runs from here to the request leaving the wait
                pull.handed_at = time.monotonic()
                try:
                    self.connector.start_pull(
                        pull.request_id, pull.params, pull.local_block_ids, pull.remote_block_ids
                    )
                    continue
                except ValueError as e:
                    reason = str(e)
            # no pull started: release the producer, then the policy decides
            self.connector.notify_done(pull.request_id, pull.params)
            self._pull_failed(pull.request_id, reason)

    def on_first_token(self, request: Request, output: RequestOutput) -> None:
        """A consumer holds no blocks for others: prefill_only requests are a producer's."""

    def _pull_failed(self, request_id: str, reason: str) -> None:
        if self.kv_load_failure_policy == "recompute":
            self.scheduler.requeue_failed_pull(request_id)
        else:
            self.scheduler.fail_pull(
                request_id,
                f"loading the prompt's KV cache from the prefill worker failed: {reason} "
                "(kv_load_failure_policy is fail; set it to recompute to compute the prompt here instead)",
            )


def first_token_id(params: dict[str, Any], vocab_size: int) -> int:
    """The token the prefill worker sampled, from kv_transfer_params; ValueError if absent
    or not a token of this model."""
    token = params.get("first_token_id") if isinstance(params, dict) else None
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
        raise ValueError(
            f"kv_transfer_params.first_token_id must be the token id the prefill worker sampled "
            f"(an int in [0, {vocab_size})), got {token!r}; the router adds it from the prefill answer"
        )
    return token
