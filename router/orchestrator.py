"""One engine request across the workers, as docs/disaggregation-flow.md lays it out.

    async with aclosing(orchestrator.generate(spec, priority, cache_salt, lora)) as deltas:
        async for delta in deltas:   # TokenDelta messages, the first token first
            ...

For each request: hash the prompt's blocks (under its LoRA adapter, if it names one: the
same prompt under two adapters has different KV), let the routing policy pick a decode worker
D, and decide where the prompt is prefilled. When the part D lacks is shorter than
--local-prefill-threshold tokens, or no prefill worker is healthy, D prefills it itself.
Otherwise a prefill worker P (picked by the same policy over the prefill workers) runs
it with `prefill_only`; its first token goes to the caller at once, and D gets the
prompt with P's kv_transfer_params plus that first token. If P fails (an error it blames
on itself, no answer, or it goes away) D recomputes the prompt itself; the request goes
on. A request under an adapter carries it ({"name", "path", "id"}) to both workers,
which load it on first use.

Closing the generator early (the client left, a stop string matched) aborts the request
on the workers that still hold it. A worker's error, a worker that goes away, or one
silent for --worker-reply-timeout ends the request with an OpenAIError; nothing waits
forever. Torch-free.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from common.block_hash import install_cluster_hash_seed, shared_hash_seed
from common.lora.lora_request import LoRARequest
from common.openai_api import OpenAIError, SequenceSpec
from common.protocol import (
    Abort,
    ErrorMessage,
    GenerateRequest,
    TokenDelta,
    WorkerRole,
    sampling_params_to_wire,
)
from router.config import RouterConfig
from router.errors import RetryLater, no_worker_available
from router.metrics import RouterMetrics
from router.policy import (
    NoWorkerAvailable,
    RequestView,
    RoutingDecision,
    RoutingPolicy,
    should_prefill_locally,
)
from router.prefix_index import request_block_hashes
from router.worker_client import WorkerClient, WorkerLost, WorkerUnavailable
from router.worker_pool import WorkerPool
from router.worker_state import WorkerState

logger = logging.getLogger(__name__)


@dataclass
class _Route:
    decode: WorkerClient
    decode_decision: RoutingDecision
    prefill: WorkerClient | None
    prefill_decision: RoutingDecision | None


class Orchestrator:
    def __init__(self, pool: WorkerPool, config: RouterConfig, metrics: RouterMetrics | None = None) -> None:
        self.pool = pool
        self.config = config
        self.metrics = metrics
        self._policies = {
            role: RoutingPolicy(pool.prefix_index, pool.block_size, config.policy_weights)
            for role in (WorkerRole.PREFILL, WorkerRole.DECODE)
        }
        # xxhash chains are seeded from the cluster secret when PYTHONHASHSEED is unset,
        # as the workers' are (common/block_hash.py)
        install_cluster_hash_seed(config.cluster_secret)
        self._warned_no_seed = False

    async def generate(
        self,
        spec: SequenceSpec,
        priority: int = 0,
        cache_salt: str | None = None,
        lora: LoRARequest | None = None,
    ) -> AsyncIterator[TokenDelta]:
        """The request's token deltas until one has finish_reason set; OpenAIError on failure."""
        worker_request_id = f"{spec.request_id}-{uuid.uuid4().hex[:8]}"  # unique even if clients reuse ids
        route = self._route(spec.prompt_token_ids, cache_salt, lora)
        request = GenerateRequest(
            request_id=worker_request_id,
            prompt_token_ids=spec.prompt_token_ids,
            sampling_params=sampling_params_to_wire(spec.sampling_params),
            priority=priority,
            cache_salt=cache_salt,
            lora=None if lora is None else lora.to_wire(),
        )
        kv_transfer_params = None
        if route.prefill is not None:
            assert route.prefill_decision is not None
            first = await self._prefill(route.prefill, route.prefill_decision, request)
            if first is None:
                self._count_decision("fallback")
            else:
                self._count_decision("remote")
                leased = first.kv_transfer_params is not None and first.finish_reason is None
                try:
                    yield first
                except GeneratorExit:
                    if leased:  # nobody will pull the blocks: let P free them now
                        self._abort(route.prefill, worker_request_id)
                    raise
                if first.finish_reason is not None:
                    return
                assert first.kv_transfer_params is not None
                kv_transfer_params = {**first.kv_transfer_params, "first_token_id": first.token_ids[0]}
        else:
            self._count_decision("local")
        request.kv_transfer_params = kv_transfer_params
        async with aclosing(self._decode(route.decode, route.decode_decision, request)) as deltas:
            async for delta in deltas:
                yield delta

    # -- choosing workers ---------------------------------------------------------------

    def _route(self, prompt: list[int], cache_salt: str | None, lora: LoRARequest | None = None) -> _Route:
        block_hashes = self._block_hashes(prompt, cache_salt, lora)
        lora_name = None if lora is None else lora.name
        decode, decode_decision = self._choose(WorkerRole.DECODE, block_hashes, len(prompt), lora_name)
        if decode is None:
            raise no_worker_available("decode")
        assert decode_decision is not None
        prefill = prefill_decision = None
        if self.pool.num_healthy(WorkerRole.PREFILL) and not should_prefill_locally(
            len(prompt), decode_decision.overlap_tokens, self.config.local_prefill_threshold
        ):
            prefill, prefill_decision = self._choose(WorkerRole.PREFILL, block_hashes, len(prompt), lora_name)
        return _Route(decode, decode_decision, prefill, prefill_decision)

    def _block_hashes(
        self, prompt: list[int], cache_salt: str | None, lora: LoRARequest | None = None
    ) -> list[int]:
        """The prompt's block hashes, keyed by the adapter as the workers key them; none
        when the router cannot compute the workers' (xxhash learned from their reports,
        with no seed shared by the cluster)."""
        algo = self.pool.hash_algo
        if shared_hash_seed(algo) is None:
            if not self._warned_no_seed:
                self._warned_no_seed = True
                logger.warning(
                    "the workers hash blocks with %s but this router has no seed shared with them "
                    "(PYTHONHASHSEED or --cluster-secret-file): routing ignores cached prefixes",
                    algo,
                )
            return []
        return request_block_hashes(
            prompt, self.pool.block_size, algo, cache_salt, None if lora is None else lora.hash_key
        )

    def _choose(
        self, role: WorkerRole, block_hashes: list[int], num_prompt_tokens: int, lora_name: str | None = None
    ) -> tuple[WorkerClient | None, RoutingDecision | None]:
        policy = self._policies[role]
        policy.block_size = self.pool.block_size
        try:
            state, decision = policy.choose(
                self.pool.states(role), block_hashes, num_prompt_tokens, lora_name
            )
        except NoWorkerAvailable:
            if role is WorkerRole.PREFILL:
                return None, None  # the decode worker prefills instead
            silent = self.pool.routable(role)  # none healthy: a connected one that is busy
            if not silent:
                return None, None
            state = min(silent, key=lambda c: c.state.num_active_requests).state
            decision = self._decision_for(state, block_hashes, num_prompt_tokens, lora_name)
        if self.metrics is not None:
            self.metrics.routed.labels(state.worker_id, role.value).inc()
            self.metrics.overlap_blocks.labels(role.value).observe(decision.overlap_blocks)
            self.metrics.overlap_blocks_by_worker.labels(state.worker_id, role.value).inc(
                decision.overlap_blocks
            )
        return self.pool.client(state.worker_id), decision

    def _decision_for(
        self,
        state: WorkerState,
        block_hashes: list[int],
        num_prompt_tokens: int,
        lora_name: str | None = None,
    ) -> RoutingDecision:
        """What the policy would report for `state`, for a worker picked outside it."""
        view = RequestView(num_prompt_tokens, len(block_hashes), self.pool.block_size,
                           self.pool.prefix_index.match(block_hashes), lora_name)  # fmt: skip
        return RoutingDecision(
            worker=state,
            score=0.0,
            num_prompt_blocks=view.num_prompt_blocks,
            overlap_blocks=view.overlap_of(state.worker_id),
            overlap_tokens=view.overlap_tokens_of(state.worker_id),
            new_prefill_tokens=view.new_prefill_tokens_of(state.worker_id),
        )

    def _count_decision(self, decision: str) -> None:
        if self.metrics is not None:
            self.metrics.prefill_decisions.labels(decision).inc()

    # -- the two stages -----------------------------------------------------------------

    async def _prefill(
        self, client: WorkerClient, decision: RoutingDecision, request: GenerateRequest
    ) -> TokenDelta | None:
        """P's first token with its kv_transfer_params; None when P failed and D should
        prefill instead. An error P blames on the request itself (4xx) is the client's."""
        rid = request.request_id
        stream = client.open_stream(rid)
        state = client.state
        answered = False  # P said something about it: nothing of it is left running there
        try:
            try:
                client.send(_replace(request, prefill_only=True))
            except WorkerUnavailable as exc:
                answered = True
                raise exc
            state.note_request_sent(rid, decision.new_prefill_tokens, decision.num_prompt_blocks)
            message = await stream.receive(self.config.worker_reply_timeout_s)
            answered = True
            if isinstance(message, ErrorMessage):
                self._count_error(client, message.code)
                if 400 <= message.code < 500:
                    raise OpenAIError(message.code, message.message)
                logger.warning(
                    "prefill worker %s failed request %s (%d: %s); the decode worker prefills it",
                    client.worker_id, rid, message.code, message.message,
                )  # fmt: skip
                return None
            if not message.token_ids or (
                message.finish_reason is None and message.kv_transfer_params is None
            ):
                logger.warning(
                    "prefill worker %s answered request %s without a first token and kv_transfer_params; "
                    "the decode worker prefills it",
                    client.worker_id, rid,
                )  # fmt: skip
                self._abort(client, rid)
                return None
            return message
        except (WorkerUnavailable, WorkerLost, TimeoutError) as exc:
            logger.warning("prefill of request %s on worker %s failed (%s); the decode worker prefills it",
                           rid, client.worker_id, _describe(exc, self.config))  # fmt: skip
            return None
        finally:
            stream.close()
            state.note_request_finished(rid)
            if not answered:  # timed out, lost, or the client left: stop it there
                self._abort(client, rid)

    async def _decode(
        self, client: WorkerClient, decision: RoutingDecision, request: GenerateRequest
    ) -> AsyncIterator[TokenDelta]:
        rid = request.request_id
        stream = client.open_stream(rid)
        state = client.state
        finished = False
        try:
            try:
                client.send(request)
            except WorkerUnavailable as exc:
                finished = True
                raise _unavailable(exc) from None
            remote = request.kv_transfer_params is not None
            max_tokens = int(request.sampling_params.get("max_tokens", 0))
            blocks = math.ceil((len(request.prompt_token_ids) + max_tokens) / max(self.pool.block_size, 1))
            state.note_request_sent(rid, 0 if remote else decision.new_prefill_tokens, blocks)
            prefilled = remote
            while True:
                try:
                    message = await stream.receive(self.config.worker_reply_timeout_s)
                except (WorkerLost, TimeoutError) as exc:
                    raise OpenAIError(503, f"request failed on decode worker {client.worker_id}: "
                                           f"{_describe(exc, self.config)}") from None  # fmt: skip
                if isinstance(message, ErrorMessage):
                    finished = True
                    self._count_error(client, message.code)
                    raise OpenAIError(message.code, message.message)
                if not prefilled:
                    state.note_prefill_done(rid)
                    prefilled = True
                if message.finish_reason is not None:
                    finished = True
                yield message
                if finished:
                    return
        finally:
            stream.close()
            state.note_request_finished(rid)
            if not finished:
                self._abort(client, rid)

    def _abort(self, client: WorkerClient, request_id: str) -> None:
        try:
            client.send(Abort(request_id=request_id))
        except WorkerUnavailable:
            pass  # it is gone: nothing left to stop there

    def _count_error(self, client: WorkerClient, code: int) -> None:
        if self.metrics is not None:
            self.metrics.worker_errors.labels(client.worker_id, str(code)).inc()


def _replace(request: GenerateRequest, **changes: Any) -> GenerateRequest:
    values = {**vars(request), **changes}
    return GenerateRequest(**values)


def _unavailable(exc: WorkerUnavailable) -> OpenAIError:
    return RetryLater(f"{exc}; retry shortly")


def _describe(exc: BaseException, config: RouterConfig) -> str:
    if isinstance(exc, TimeoutError):
        return f"the worker sent nothing for {config.worker_reply_timeout_s:g} s (--worker-reply-timeout)"
    return str(exc)
