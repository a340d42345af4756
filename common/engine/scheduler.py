"""Who runs this step and with how many tokens; what a step's sampled tokens change.

One token budget per step (--max-num-batched-tokens) covers everything: running
requests first (decodes one token each, then unfinished prompts their next chunk),
then waiting requests in fcfs or priority order, so several prompts and all running
decodes share a step. When the KV cache runs out of blocks for a running request, the
lowest-priority, latest-arrived running request is preempted: its blocks are freed and
it goes back to the front of the waiting queue to be recomputed (its cached full
blocks usually make that cheap). A request longer than the whole cache can ever hold
is finished as aborted instead of waiting forever.

The scheduler never touches tensors. The engine loop calls schedule(), runs the batch
(even an empty one) and hands the sampled tokens to update_from_output(), which also
returns the requests the scheduler finished on its own since the last call.

Disaggregation adds two states (remote_kv_states.py) and hands out transfer orders as
data (`KVPull`, `KVRelease`) for the worker's role to act on. A `prefill_only` request
finishes after its first token but its blocks stay held until `free_held()`. A request
with `kv_transfer_params` is admitted like any other (blocks for its prompt, its own
prefix hits reused), then waits, never scheduled nor preempted, while a `KVPull` fills
the blocks it lacks; `finish_kv_pull()` joins it to the batch, and after a failure the
role picks `requeue_failed_pull()` (compute the prompt here) or `fail_pull()`.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable

from common.config.context_length import context_length_error
from common.config.engine_config import EngineConfig
from common.engine.kv_cache_manager import KVCacheManager
from common.engine.outputs import RequestOutput, SampledToken
from common.engine.remote_kv_states import KVPull, KVRelease, RemoteKVStates
from common.engine.request import Request, RequestStatus
from common.engine.schedule_ahead import schedule_ahead
from common.engine.scheduled_batch import ScheduledBatch
from common.engine.stop_conditions import check_stop

SCHEDULING_POLICIES = ("fcfs", "priority")


class Scheduler:
    def __init__(self, config: EngineConfig, kv_cache_manager: KVCacheManager, max_model_len: int) -> None:
        batched_tokens = config.max_num_batched_tokens
        max_num_seqs = config.max_num_seqs
        chunked = config.enable_chunked_prefill
        if batched_tokens is None or max_num_seqs is None or chunked is None or config.block_size is None:
            unresolved = [
                name
                for name in ("max_num_batched_tokens", "max_num_seqs", "enable_chunked_prefill", "block_size")
                if getattr(config, name) is None
            ]
            raise ValueError(
                f"EngineConfig fields {', '.join(unresolved)} are None; resolve them from the model "
                "and device before building the scheduler"
            )
        if config.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(
                f"--scheduling-policy {config.scheduling_policy!r} is not one of {', '.join(SCHEDULING_POLICIES)}"
            )
        self.max_num_batched_tokens = batched_tokens
        self.max_num_seqs = max_num_seqs
        self.enable_chunked_prefill = chunked
        self.long_prefill_token_threshold = config.long_prefill_token_threshold
        self.max_num_partial_prefills = config.max_num_partial_prefills
        self.priority_policy = config.scheduling_policy == "priority"
        # distinct LoRA adapters the running requests may use at once: the device slots
        self.max_loras = config.lora_config.max_loras
        self.max_model_len = max_model_len
        if (
            self.max_num_seqs < 1
            or self.max_num_partial_prefills < 1
            or self.long_prefill_token_threshold < 0
        ):
            raise ValueError(
                "--max-num-seqs and --max-num-partial-prefills must be at least 1 and "
                "--long-prefill-token-threshold at least 0"
            )
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"--max-num-batched-tokens ({self.max_num_batched_tokens}) must be at least "
                f"--max-num-seqs ({self.max_num_seqs}), since every running sequence needs a token "
                "each step; raise the first or lower the second"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"--max-num-batched-tokens ({self.max_num_batched_tokens}) is smaller than "
                f"--max-model-len ({max_model_len}), so without chunked prefill a long prompt could "
                "never run; raise --max-num-batched-tokens or pass --enable-chunked-prefill"
            )
        if kv_cache_manager.block_size != config.block_size:
            raise ValueError(
                f"the KV-cache manager's block size {kv_cache_manager.block_size} differs from "
                f"--block-size {config.block_size}"
            )
        self.kv = kv_cache_manager

        self.requests: dict[str, Request] = {}  # every unfinished request by id
        # in the order they are admitted: fcfs = arrival with preempted requests in front,
        # priority = (priority, arrival_time)
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # in admission order
        self.num_preemptions = 0
        self._finished_ids: list[str] = []  # finished since the last schedule()
        # finished outside update_from_output (inside schedule(), a failed pull): handed
        # out by the next update_from_output
        self._pending_outputs: list[RequestOutput] = []
        self.remote = RemoteKVStates(kv_cache_manager)  # pulling and held requests

    # -- state ------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self.kv.usage

    @property
    def prefix_cache_queries(self) -> int:
        return self.kv.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.kv.prefix_cache_hits

    @property
    def num_waiting_for_remote_kv(self) -> int:
        return len(self.remote.pulling)

    @property
    def num_held(self) -> int:
        return len(self.remote.held)

    @property
    def num_kv_load_failures(self) -> int:
        return self.remote.num_load_failures

    @property
    def num_queued_prefill_tokens(self) -> int:
        """Prompt tokens accepted and still to compute here (a remote-KV request's count
        none: its prompt arrives by transfer)."""
        waiting = sum(
            r.num_tokens - r.num_computed_tokens for r in self.waiting if not r.awaits_remote_kv_admission
        )
        running = sum(r.num_tokens - r.num_computed_tokens for r in self.running if _is_prefilling(r))
        return waiting + running

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending_outputs)

    def has_schedulable_requests(self) -> bool:
        """Whether schedule() may have work: requests running or waiting (not the ones
        only waiting for a pull), or finished outputs to hand out."""
        return bool(self.running) or bool(self.waiting) or bool(self._pending_outputs)

    def has_kv_transfers(self) -> bool:
        """Pulls in flight, blocks held for consumers, or transfer orders not yet taken."""
        return self.remote.has_work()

    # -- requests in and out ----------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request. Raises ValueError for a duplicate id, an empty prompt or one
        longer than max_model_len (the engine validates before, so these are its bugs).

        request.prefill_only: hold the blocks after the first token (see the module's
        docstring). request.kv_transfer_params: the prompt's KV is at a producer; the
        request already holds its first token as an output.
        """
        rid = request.request_id
        kv_transfer_params = request.kv_transfer_params
        if rid in self.requests or rid in self.remote:
            raise ValueError(
                f"request id {rid!r} is already in the scheduler (running, ending a KV pull, or "
                "holding blocks for a consumer); give every request a unique id"
            )
        if request.prefill_only and kv_transfer_params is not None:
            raise ValueError(
                f"request {rid}: prefill_only and kv_transfer_params exclude each other "
                "(a request is either prefilled for a consumer or pulls its prompt's KV)"
            )
        if kv_transfer_params is not None and request.num_output_tokens < 1:
            raise ValueError(
                f"request {rid}: a request whose KV is remote must hold the producer's first token"
            )
        if request.num_prompt_tokens == 0:
            raise ValueError(f"request {request.request_id}: the prompt is empty")
        too_long = context_length_error(request.num_prompt_tokens, 0, self.max_model_len)
        if too_long is not None:
            raise ValueError(f"request {rid}: {too_long}")
        request.status = RequestStatus.WAITING
        self.requests[rid] = request
        if kv_transfer_params is not None:
            status = check_stop(request, self.max_model_len)
            if status is not None:  # the producer's first token already ends it (_finish releases)
                self._finish(request, status)
                self._pending_outputs.append(self._output(request, None))
                return
        self._enqueue_waiting(request, front=False)

    def abort_requests(self, request_ids: list[str]) -> list[RequestOutput]:
        """Finish the given unfinished requests as aborted; unknown ids are ignored."""
        outputs = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status == RequestStatus.WAITING_FOR_REMOTE_KV:
                # the transfer still writes into its blocks: free them when it ends
                self.remote.abandon(request)
                del self.requests[request_id]
                request.status = RequestStatus.FINISHED_ABORTED
                self._finished_ids.append(request_id)
            else:
                self._finish(request, RequestStatus.FINISHED_ABORTED)
            outputs.append(self._output(request, None))
        return outputs

    # -- KV transfer (disaggregation) ------------------------------------------------

    def take_kv_transfer_orders(self) -> tuple[list[KVPull], list[KVRelease]]:
        """The pulls to start and the releases to send since the last call."""
        return self.remote.take_orders()

    def finish_kv_pull(self, request_id: str) -> None:
        """The request's pull landed: its whole prompt is computed, and it joins the running
        batch (its next step computes the first token's KV and samples the second)."""
        request = self.remote.end_pull(request_id, failed=False)
        if request is None:
            return
        request.num_computed_tokens = request.num_prompt_tokens
        self.kv.cache_blocks(request)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def requeue_failed_pull(self, request_id: str) -> None:
        """The request's pull failed (its pulled blocks hold nothing usable): compute the
        prompt here instead, by chunks, from its own prefix hits (its blocks stay)."""
        request = self.remote.end_pull(request_id, failed=True)
        if request is None:
            return
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def fail_pull(self, request_id: str, error: str) -> None:
        """The request's pull failed: finish it as aborted, its output carrying `error`
        (handed out by the next update_from_output)."""
        request = self.remote.end_pull(request_id, failed=True)
        if request is None:
            return
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        output = self._output(request, None)
        output.error = error
        self._pending_outputs.append(output)

    def free_held(self, request_id: str) -> bool:
        """Free a held request's blocks (its consumer is done, or the lease ran out)."""
        return self.remote.free_held(request_id)

    def held_request(self, request_id: str) -> Request | None:
        """The finished prefill_only request whose blocks are held under this id, if any."""
        return self.remote.held.get(request_id)

    def _admit_remote(self, request: Request) -> bool:
        """Give a remote-KV request blocks for its prompt, with its local prefix hits, and
        order the pull of the rest; False (nothing touched) when the blocks are not there."""
        num_prompt = request.num_prompt_tokens
        hits, num_hit_tokens = self.kv.get_computed_blocks(request)
        # the prompt's blocks now; the first token's slot comes with its decode step
        if self.kv.allocate_slots(request, num_prompt - num_hit_tokens, hits) is None:
            return False
        self.waiting.pop(0)
        request.num_computed_tokens = num_hit_tokens
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit_tokens
        if not self.remote.park(request, num_hit_tokens):  # every prompt block was a local hit
            self.remote.release(request)
            request.num_computed_tokens = num_prompt
            request.status = RequestStatus.RUNNING
            self.running.append(request)
        return True

    # -- one step -----------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        capacity = self.kv.capacity_tokens
        scheduled: list[Request] = []
        num_scheduled: dict[str, int] = {}
        preempted: list[str] = []

        # Running requests: decodes first (they keep inter-token latency steady), then
        # unfinished prompts; sorted() is stable, so each group keeps admission order.
        for request in sorted(self.running, key=_is_prefilling):
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if request.num_tokens > capacity:
                self._finish_unrunnable(request)
                continue
            num_new = self._num_new_tokens(request.num_tokens - request.num_computed_tokens, budget)
            if num_new == 0:
                continue
            while True:
                if self.kv.allocate_slots(request, num_new) is not None:
                    scheduled.append(request)
                    num_scheduled[request.request_id] = num_new
                    budget -= num_new
                    break
                victim = self._preemption_victim()
                if victim.request_id in num_scheduled:
                    budget += num_scheduled.pop(victim.request_id)
                    scheduled.remove(victim)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break

        # Waiting requests, unless this step already had to preempt (no blocks to spare).
        num_partial = sum(
            1
            for r in self.running
            if r.num_computed_tokens + num_scheduled.get(r.request_id, 0) < r.num_tokens
        )
        loras = self._running_loras()
        lora_skipped: list[Request] = []  # their adapter would exceed --max-loras this step
        while not preempted and self.waiting and len(self.running) + len(self.remote.pulling) < self.max_num_seqs:
            request = self.waiting[0]
            if request.num_tokens > capacity:
                self.waiting.pop(0)
                self._finish_unrunnable(request)
                continue
            if request.lora is not None and request.lora.hash_key not in loras:
                if len(loras) >= self.max_loras:
                    lora_skipped.append(self.waiting.pop(0))
                    continue
                loras.add(request.lora.hash_key)  # a request admitted below keeps it running
            if request.awaits_remote_kv_admission:
                # admitting it computes nothing this step, so it needs no budget
                if not self._admit_remote(request):
                    break
                continue
            if budget == 0:
                break
            hits, num_hit_tokens = self.kv.get_computed_blocks(request)
            num_remaining = request.num_tokens - num_hit_tokens
            num_new = self._num_new_tokens(num_remaining, budget)
            if num_new == 0:
                break
            partial = num_new < num_remaining
            if partial and num_partial >= self.max_num_partial_prefills:
                break
            if self.kv.allocate_slots(request, num_new, hits) is None:
                break
            self.waiting.pop(0)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            self.running.append(request)
            scheduled.append(request)
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            num_partial += partial
        if lora_skipped:  # first in line again, in their order
            self.waiting[:0] = lora_skipped

        finished_ids, self._finished_ids = self._finished_ids, []
        return ScheduledBatch(
            requests=scheduled,
            num_scheduled_tokens=[num_scheduled[r.request_id] for r in scheduled],
            block_tables=[self.kv.get_block_ids(r.request_id) for r in scheduled],
            preempted_request_ids=preempted,
            finished_request_ids=finished_ids,
        )

    def _running_loras(self) -> set[tuple[str, str]]:
        """The adapters of the running and pulling requests: each holds a device slot."""
        requests = itertools.chain(self.running, self.remote.pulling.values())
        return {r.lora.hash_key for r in requests if r.lora is not None}

    def schedule_ahead(
        self, batch: ScheduledBatch, may_run_ahead: Callable[[Request], bool]
    ) -> ScheduledBatch | None:
        """The decode step after `batch`, scheduled before its tokens are known
        (--async-scheduling); None when schedule() must plan it (schedule_ahead.py)."""
        return schedule_ahead(self, batch, may_run_ahead)

    def update_from_output(
        self, batch: ScheduledBatch, sampled: dict[str, SampledToken]
    ) -> list[RequestOutput]:
        """Advance the batch's requests by their scheduled tokens, append the sampled ones,
        finish those that stop. Returns an output for every request that got a token or
        finished (including the ones schedule() finished)."""
        outputs, self._pending_outputs = self._pending_outputs, []
        for request, num_tokens in zip(batch.requests, batch.num_scheduled_tokens, strict=True):
            if (
                request.status != RequestStatus.RUNNING
                or self.requests.get(request.request_id) is not request
            ):
                continue  # aborted while the step ran
            request.num_computed_tokens += num_tokens
            if request.num_computed_tokens < request.num_tokens:
                # mid-prompt chunk or recompute: nothing sampled this step
                self.kv.cache_blocks(request)
                continue
            token = sampled.get(request.request_id)
            if token is None:
                raise RuntimeError(
                    f"request {request.request_id} reached the end of its tokens this step but got no "
                    "sampled token; the runner must sample for every request whose chunk ends its tokens"
                )
            request.append_output_token(token.token_id)
            self.kv.cache_blocks(request)
            status = check_stop(request, self.max_model_len)
            if status is not None:
                self._finish(request, status)
            elif request.prefill_only:
                self._hold(request)
            outputs.append(self._output(request, token))
        return outputs

    # -- helpers ------------------------------------------------------------------

    def _num_new_tokens(self, num_remaining: int, budget: int) -> int:
        """Tokens of a request to compute this step; 0 when it has to wait."""
        if not self.enable_chunked_prefill:
            return num_remaining if num_remaining <= budget else 0
        if 0 < self.long_prefill_token_threshold < num_remaining:
            num_remaining = self.long_prefill_token_threshold
        return min(num_remaining, budget)

    def _enqueue_waiting(self, request: Request, front: bool) -> None:
        if self.priority_policy:
            bisect.insort(self.waiting, request, key=_priority_key)
        elif front:
            self.waiting.insert(0, request)
        else:
            self.waiting.append(request)

    def _preemption_victim(self) -> Request:
        """The running request that yields first: lowest priority (under the priority
        policy), then latest arrival, then latest admitted."""
        if self.priority_policy:
            return max(enumerate(self.running), key=lambda ir: (ir[1].priority, ir[1].arrival_time, ir[0]))[1]
        return max(enumerate(self.running), key=lambda ir: (ir[1].arrival_time, ir[0]))[1]

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        self.running.remove(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue_waiting(request, front=True)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        rid = request.request_id
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if request.awaits_remote_kv_admission:  # never admitted: nothing will be pulled
            self.remote.release(request)
        request.status = status
        self.kv.free(request)
        del self.requests[rid]
        self._finished_ids.append(rid)

    def _hold(self, request: Request) -> None:
        """A prefill_only request has its first token: it leaves the batch, its blocks stay."""
        self.running.remove(request)
        self.remote.hold(request)
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)

    def _finish_unrunnable(self, request: Request) -> None:
        """A request longer than the whole KV cache: waiting would never end, so abort it."""
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        self._pending_outputs.append(self._output(request, None))

    @staticmethod
    def _output(request: Request, token: SampledToken | None) -> RequestOutput:
        status = request.status
        logprobs = token.logprobs if token is not None else None
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=[token.token_id] if token is not None else [],
            new_logprobs=[logprobs] if logprobs is not None else None,
            finished=status.finished,
            finish_reason=status.finish_reason,
            stop_reason=request.stop_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=max(request.num_cached_tokens, 0),
        )


def _is_prefilling(request: Request) -> bool:
    return request.num_tokens - request.num_computed_tokens > 1


def _priority_key(request: Request) -> tuple[int, float]:
    return (request.priority, request.arrival_time)
