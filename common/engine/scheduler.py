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
"""

from __future__ import annotations

import bisect

from common.config.engine_config import EngineConfig
from common.engine.kv_cache_manager import KVCacheManager
from common.engine.outputs import RequestOutput, SampledToken
from common.engine.request import Request, RequestStatus
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
        self._pending_outputs: list[RequestOutput] = []  # finished inside schedule()

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

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending_outputs)

    # -- requests in and out ----------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request. Raises ValueError for a duplicate id, an empty prompt or one
        longer than max_model_len (the engine validates before, so these are its bugs)."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the scheduler")
        if request.num_prompt_tokens == 0:
            raise ValueError(f"request {request.request_id}: the prompt is empty")
        if request.num_prompt_tokens > self.max_model_len:
            raise ValueError(
                f"request {request.request_id}: prompt has {request.num_prompt_tokens} tokens, more "
                f"than --max-model-len {self.max_model_len}; shorten it or raise --max-model-len"
            )
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self._enqueue_waiting(request, front=False)

    def abort_requests(self, request_ids: list[str]) -> list[RequestOutput]:
        """Finish the given unfinished requests as aborted; unknown ids are ignored."""
        outputs = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None:
                self._finish(request, RequestStatus.FINISHED_ABORTED)
                outputs.append(self._output(request, None))
        return outputs

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
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if request.num_tokens > capacity:
                self.waiting.pop(0)
                self._finish_unrunnable(request)
                continue
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

        finished_ids, self._finished_ids = self._finished_ids, []
        return ScheduledBatch(
            requests=scheduled,
            num_scheduled_tokens=[num_scheduled[r.request_id] for r in scheduled],
            block_tables=[self.kv.get_block_ids(r.request_id) for r in scheduled],
            preempted_request_ids=preempted,
            finished_request_ids=finished_ids,
        )

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
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = status
        self.kv.free(request)
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
