"""Where a worker's role enters the engine's step: the KV-transfer hooks.

The engine stays role-agnostic. Its scheduler keeps the mechanism (requests parked while
their prompt's KV arrives, finished requests whose blocks stay held) and hands out
transfer orders as data; a role acts on them through a connector, by the hooks below.
A worker attaches the hooks of its one role (`LLMEngine.attach_kv_transfer`); an engine
that plays both sides in one process attaches both sets, and the engine calls every set
at each point, each acting only on the requests that concern its side.

The hooks act on the engine through the scheduler (`finish_kv_pull`, `requeue_failed_pull`,
`fail_pull`, `free_held`); a request they fail comes out of the next step's outputs.
"""

from __future__ import annotations

from typing import Protocol

from common.engine.outputs import RequestOutput
from common.engine.remote_kv_states import KVPull, KVRelease
from common.engine.request import Request


class KVTransferHooks(Protocol):
    def admit(self, request: Request) -> bool:
        """At admission, before the request is queued: True when this side takes charge of
        it (a producer: a prefill_only request; a consumer: one with kv_transfer_params),
        after completing it (a consumer appends the producer's first token); ValueError,
        saying what to change, when it takes charge but the request is bad."""
        ...

    def on_step_start(self) -> None:
        """At the start of every step, and while the engine only waits on transfers: the
        connector's news (landed or failed pulls, blocks consumers are done with)."""
        ...

    def on_orders(self, pulls: list[KVPull], releases: list[KVRelease]) -> None:
        """After schedule() (and after an add or an abort): the transfer orders to act on.
        Stamp each pull's `handed_at` (time.monotonic()) just before handing it to the
        connector: the engine times the pull from there until it lands."""
        ...

    def on_first_token(self, request: Request, output: RequestOutput) -> None:
        """A prefill_only request got its first token and its blocks are held: `output` is
        its finished output, on its way to the caller (set its kv_transfer_params)."""
        ...
