"""Which workers hold a LoRA adapter, as the router knows it: those whose last load report
lists it (`loras`: the adapters in the worker's host memory), and for a while those the
router has just sent a request naming it, which load it when the request arrives and say
so only in a later report. Without the second part, the requests that follow a cold
adapter's first one see no holder anywhere and spread, each worker loading it again (as
pending_prefixes.py does for prompt blocks)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from router.worker_state import WorkerState


def reported_loras(worker: WorkerState) -> Sequence[str]:
    """The adapters `worker`'s last load report lists (none before its first report)."""
    return worker.load.loras


class LoRAHolders:
    def __init__(self, pending_s: float) -> None:
        if pending_s < 0:
            raise ValueError(f"the pending-adapter time must be 0 or more seconds, got {pending_s}")
        self.pending_s = pending_s
        self._sent: dict[str, dict[Hashable, float]] = {}  # adapter -> worker id -> claim expiry

    def holders(self, lora_name: str, workers: Sequence[WorkerState], now: float) -> frozenset[Hashable]:
        """The ids of `workers` that hold `lora_name` or were sent it less than pending_s ago."""
        sent = self._sent.get(lora_name, {})
        for worker_id in [w for w, expiry in sent.items() if expiry <= now]:
            del sent[worker_id]
        return frozenset(
            w.worker_id for w in workers if w.worker_id in sent or lora_name in reported_loras(w)
        )

    def note_sent(self, worker_id: Hashable, lora_name: str, now: float) -> None:
        """A request naming `lora_name` was sent to `worker_id` at `now`."""
        if self.pending_s > 0:
            self._sent.setdefault(lora_name, {})[worker_id] = now + self.pending_s
