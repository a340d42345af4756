"""The scheduler's bookkeeping for KV that lives in another engine, and the transfer
orders it hands out as data (the scheduler never calls a connector).

Two states sit outside the running batch (docs/disaggregation-flow.md):

- Pulling (consumer side): a request admitted with blocks for its prompt, parked as
  WAITING_FOR_REMOTE_KV while a `KVPull` fills the blocks its own prefix cache lacks. It
  holds its seat and its blocks, is never scheduled nor preempted, and leaves the state
  when the pull lands or fails. Aborted meanwhile, it is "abandoned": its blocks stay
  allocated until the pull ends, since the transfer writes into them until then.
- Held (producer side): a `prefill_only` request finished after its first token
  (FINISHED_REMOTE_DECODE) whose blocks stay allocated until `free_held()`.

What to do when a pull fails, and when to free held blocks, is the role's policy; this
module only keeps the states and the orders. It also times each pull as the engine sees
it: from the role handing the order to its connector (`KVPull.handed_at`, stamped by the
role) until the request leaves the wait with its blocks filled (`end_pull`), for the
worker's pdserve:kv_pull_seconds.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any

from common.engine.kv_cache_manager import KVCacheManager
from common.engine.request import Request, RequestStatus


@dataclass
class KVPull:
    """Copy a request's `remote_block_ids` (at the producer its params name) into its
    `local_block_ids`, pairwise: the prompt blocks it lacks after its own prefix hits.

    `error` set: the params do not fit the prompt, so no pull can be made; the consumer
    releases the producer and treats it as a failed pull."""

    request_id: str
    params: dict[str, Any]
    local_block_ids: list[int]
    remote_block_ids: list[int]
    error: str | None = None
    # time.monotonic() when the role handed the pull to its connector; the role stamps it
    # just before start_pull, and a pull never stamped is not timed
    handed_at: float | None = None


@dataclass(frozen=True)
class LandedPull:
    """A pull whose blocks are usable: `seconds` from its hand-off to the connector until
    the request left the remote-KV wait, `num_blocks` blocks filled."""

    request_id: str
    seconds: float
    num_blocks: int


@dataclass
class KVRelease:
    """Tell the producer of a request's KV that it may free the blocks: nothing will be pulled."""

    request_id: str
    params: dict[str, Any]


# landed pulls kept for the worker's metrics until taken; an engine without metrics never
# takes them, so the oldest go
MAX_LANDED_PULLS = 4096


class RemoteKVStates:
    """Pulling, abandoned and held requests, by id, and the orders not yet taken."""

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.pulling: dict[str, Request] = {}  # WAITING_FOR_REMOTE_KV
        self.abandoned: dict[str, Request] = {}  # aborted while pulling
        self.held: dict[str, Request] = {}  # FINISHED_REMOTE_DECODE with their blocks
        self.num_load_failures = 0
        self._pulls: list[KVPull] = []
        self._releases: list[KVRelease] = []
        self._ordered: dict[str, KVPull] = {}  # the pull order of each pulling or abandoned request
        self._landed: collections.deque[LandedPull] = collections.deque(maxlen=MAX_LANDED_PULLS)

    def __contains__(self, request_id: str) -> bool:
        """Whether the id still has blocks here outside the scheduler's requests."""
        return request_id in self.abandoned or request_id in self.held

    def has_work(self) -> bool:
        """Pulls in flight, blocks held for consumers, or orders not yet taken."""
        return bool(self.pulling or self.abandoned or self.held or self._pulls or self._releases)

    def take_orders(self) -> tuple[list[KVPull], list[KVRelease]]:
        pulls, self._pulls = self._pulls, []
        releases, self._releases = self._releases, []
        return pulls, releases

    def take_landed(self) -> tuple[LandedPull, ...]:
        """The timed pulls whose blocks became usable since the last call."""
        if not self._landed:  # nearly every step: no list built
            return ()
        landed = tuple(self._landed)
        self._landed.clear()
        return landed

    # -- consumer ---------------------------------------------------------------------

    def release(self, request: Request) -> None:
        """Order the producer's release: this request will pull nothing."""
        assert request.kv_transfer_params is not None
        self._releases.append(KVRelease(request.request_id, request.kv_transfer_params))

    def park(self, request: Request, num_hit_tokens: int) -> bool:
        """A remote-KV request just got blocks for its prompt, the first `num_hit_tokens`
        from its own prefix cache: order the pull of the rest and park it. False (nothing
        ordered) when every prompt block was a local hit."""
        params = request.kv_transfer_params
        assert params is not None
        rid = request.request_id
        num_prompt = request.num_prompt_tokens
        bs = self.kv.block_size
        num_prompt_blocks = -(-num_prompt // bs)
        first_missing = num_hit_tokens // bs
        remote_ids = params.get("remote_block_ids")
        remote_tokens = params.get("remote_num_tokens")
        error = None
        if not isinstance(remote_ids, list) or len(remote_ids) != num_prompt_blocks:
            count = len(remote_ids) if isinstance(remote_ids, list) else "no"
            error = (
                f"kv_transfer_params name {count} remote blocks, but a {num_prompt}-token prompt "
                f"fills {num_prompt_blocks} blocks of {bs} tokens (a different prompt or block size?)"
            )
        elif remote_tokens is not None and remote_tokens != num_prompt:
            error = f"the producer computed {remote_tokens} tokens, but the prompt has {num_prompt}"
        if error is None and first_missing == num_prompt_blocks:
            return False
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.pulling[rid] = request
        if error is not None:
            pull = KVPull(rid, params, [], [], error)
        else:
            local_ids = self.kv.get_block_ids(rid)[first_missing:num_prompt_blocks]
            pull = KVPull(rid, params, local_ids, list(remote_ids[first_missing:]))
        self._pulls.append(pull)
        self._ordered[rid] = pull
        return True

    def abandon(self, request: Request) -> None:
        """A pulling request was aborted: keep its blocks until its pull ends."""
        del self.pulling[request.request_id]
        self.abandoned[request.request_id] = request

    def end_pull(self, request_id: str, failed: bool) -> Request | None:
        """The request's pull ended: the parked request, or None when it was abandoned (its
        blocks are freed now) or is unknown. A pull that landed for a parked request is
        timed here: its blocks are usable from now on."""
        pull = self._ordered.pop(request_id, None)
        abandoned = self.abandoned.pop(request_id, None)
        if abandoned is not None:
            self.kv.free(abandoned)
            return None
        request = self.pulling.pop(request_id, None)
        if request is not None and failed:
            self.num_load_failures += 1
        elif request is not None and pull is not None and pull.handed_at is not None:
            seconds = time.monotonic() - pull.handed_at
            self._landed.append(LandedPull(request_id, seconds, len(pull.local_block_ids)))
        return request

    # -- producer ---------------------------------------------------------------------

    def hold(self, request: Request) -> None:
        request.status = RequestStatus.FINISHED_REMOTE_DECODE
        self.held[request.request_id] = request

    def free_held(self, request_id: str) -> bool:
        """Free a held request's blocks (its consumer is done, or the lease ran out)."""
        request = self.held.pop(request_id, None)
        if request is None:
            return False
        self.kv.free(request)
        return True
