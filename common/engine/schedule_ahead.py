"""Scheduling one decode step ahead (--async-scheduling): the step after a pure-decode
batch, planned while that batch still runs on the GPU, so the GPU never waits for the
host between decode steps. The scheduler calls it; it only reads the scheduler's queues
and reserves cache slots, like schedule() does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from common.engine.request import Request, RequestStatus
from common.engine.scheduled_batch import ScheduledBatch

if TYPE_CHECKING:
    from common.engine.scheduler import Scheduler


def schedule_ahead(
    scheduler: Scheduler, batch: ScheduledBatch, may_run_ahead: Callable[[Request], bool]
) -> ScheduledBatch | None:
    """The decode step after `batch`, scheduled before `batch`'s tokens are known
    (--async-scheduling): each of its requests one token further, fed the token `batch`
    samples for it. None when the next step must be scheduled with schedule() instead:
    `batch` was not pure decode, requests wait for admission, a request joined the batch
    (a landed pull), a request fails `may_run_ahead` (its sampling reads its own history),
    or the cache has no block to spare. A request whose `batch` token ends it by length
    is left out; one that `batch`'s token stops (EOS, a stop token) runs one step in
    vain, and update_from_output() skips it.

    Call it before update_from_output(batch), and update with this batch after it.
    """
    if scheduler.waiting or any(n != 1 for n in batch.num_scheduled_tokens):
        return None
    in_batch = {id(r) for r in batch.requests}
    if any(id(r) not in in_batch for r in scheduler.running):
        return None
    requests = []
    for request in batch.requests:
        if request.status != RequestStatus.RUNNING or scheduler.requests.get(request.request_id) is not request:
            continue  # finished or aborted since
        # once `batch` appends its token: num_output_tokens + 1 outputs, num_tokens + 1 tokens
        if (
            request.num_output_tokens + 1 >= request.sampling_params.max_tokens
            or request.num_tokens + 1 >= scheduler.max_model_len
            or request.num_computed_tokens + 1 != request.num_tokens
        ):
            continue
        if request.prefill_only or not may_run_ahead(request):
            return None
        requests.append(request)
    if not requests:
        return None
    for request in requests:
        # slots for the token `batch` computes and the one this step computes
        if scheduler.kv.allocate_slots(request, 2) is None:
            return None
    return ScheduledBatch(
        requests=requests,
        num_scheduled_tokens=[1] * len(requests),
        block_tables=[scheduler.kv.get_block_ids(r.request_id) for r in requests],
        ahead=True,
    )
