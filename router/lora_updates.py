"""Loading and unloading a LoRA adapter on every worker at run time: what
/v1/load_lora_adapter and /v1/unload_lora_adapter do (router/routes/lora_adapters.py).

A load reserves the name (router/lora_adapters.py), sends LoadLoRA to every connected
worker, prefill and decode, and waits for their LoRAResults. If every worker that
answered took it, the adapter is served from then on. If one refuses (no adapter at the
path, a malformed adapter_config.json, a rank above --max-lora-rank, a target module the
model lacks), the request fails with that worker's status and words, and the workers
that did load it are told to unload it: nothing is left half-loaded. A worker that cannot
be reached, or does not answer within --worker-reply-timeout, is left out: it learns the
adapter from the first request that names it (every GenerateRequest carries name, path
and id), as does a worker that joins later.

An unload takes the adapter out of the registry first, so new requests naming it get
404 at once, then sends UnloadLoRA everywhere; requests already running under it finish
(the engine keeps an adapter until its last request ends). Torch-free.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

from common.lora.lora_request import LoRARequest
from common.openai_api import OpenAIError
from common.protocol import ErrorMessage, LoadLoRA, LoRAResult, Message, UnloadLoRA
from router.errors import RetryLater
from router.lora_adapters import LoRAAdapters
from router.worker_client import WorkerClient, WorkerLost, WorkerUnavailable
from router.worker_pool import WorkerPool

logger = logging.getLogger(__name__)

# what vLLM's endpoints call a request they refuse before asking the engine
INVALID_USER_INPUT = "InvalidUserInput"

Outcome = LoRAResult | ErrorMessage | Exception  # one worker's answer, or why there is none


class LoRAUpdates:
    def __init__(self, pool: WorkerPool, adapters: LoRAAdapters, reply_timeout_s: float) -> None:
        self.pool = pool
        self.adapters = adapters
        self.reply_timeout_s = reply_timeout_s

    async def load(self, name: str, path: str) -> LoRARequest:
        """Load the adapter in `path` on every worker and serve it as `name`; OpenAIError when
        the name is taken (400) or a worker refuses it (its status: 400, 404 for no adapter
        at the path), 503 when no worker could be asked."""
        try:
            lora = self.adapters.reserve(name, path)
        except ValueError as exc:
            raise OpenAIError(400, str(exc), type=INVALID_USER_INPUT) from None
        try:
            outcomes = await self._ask_all(lambda rid: LoadLoRA(request_id=rid, lora=lora.to_wire()))
            refusals = [
                (c, o) for c, o in outcomes if isinstance(o, ErrorMessage | LoRAResult) and not _ok(o)
            ]
            if refusals:
                refusing = {client for client, _ in refusals}
                await self._roll_back(lora, [c for c, _ in outcomes if c not in refusing])
                raise _refused(*refusals[0])
            if not any(_ok(o) for _, o in outcomes):
                raise RetryLater(
                    f"no worker could be asked to load LoRA adapter '{name}' "
                    f"({_why_none(outcomes)}); retry when the workers are up"
                )
        except BaseException:
            self.adapters.release(name)
            raise
        self.adapters.publish(lora)
        logger.info("loaded LoRA adapter %r (id %d) from %s on %d workers", name, lora.id, path,
                    sum(1 for _, o in outcomes if _ok(o)))  # fmt: skip
        return lora

    async def unload(self, name: str | None, lora_id: int | None = None) -> str:
        """Stop serving the adapter named `name` (or with id `lora_id`) and unload it from
        every worker; its name. OpenAIError 404 when no such adapter is served."""
        if name is None and lora_id is not None:
            name = self.adapters.name_of_id(lora_id)
        lora = self.adapters.remove(name) if name is not None else None
        if lora is None:
            raise OpenAIError(404, f"The lora adapter '{name}' cannot be found.", type="NotFoundError")
        outcomes = await self._ask_all(lambda rid: UnloadLoRA(request_id=rid, lora_name=lora.name))
        for client, outcome in outcomes:
            if isinstance(outcome, Exception) or (isinstance(outcome, LoRAResult) and outcome.code >= 500):
                logger.warning("worker %s did not unload LoRA adapter %r: %s", client.worker_id, lora.name,
                               _describe(outcome))  # fmt: skip
        logger.info("unloaded LoRA adapter %r (id %d)", lora.name, lora.id)
        return lora.name

    # -- asking the workers ------------------------------------------------------------------

    async def _ask_all(
        self, message: Callable[[str], Message], clients: list[WorkerClient] | None = None
    ) -> list[tuple[WorkerClient, Outcome]]:
        """Each connected worker's answer to its own copy of `message(request_id)`, asked at once."""
        if clients is None:
            clients = [c for c in self.pool.clients() if c.connected]
        outcomes = await asyncio.gather(*(self._ask(c, message(f"lora-{uuid.uuid4().hex}")) for c in clients))
        return list(zip(clients, outcomes, strict=True))

    async def _ask(self, client: WorkerClient, message: Message) -> Outcome:
        stream = client.open_stream(message.request_id)
        try:
            client.send(message)
            answer = await stream.receive(self.reply_timeout_s)
        except (WorkerUnavailable, WorkerLost, TimeoutError) as exc:
            return exc
        finally:
            stream.close()
        if isinstance(answer, LoRAResult | ErrorMessage):
            return answer
        return ErrorMessage(message.request_id, 500, f"the worker answered with a {answer.TYPE!r} message")

    async def _roll_back(self, lora: LoRARequest, clients: list[WorkerClient]) -> None:
        """Unload a refused adapter from the workers that did not refuse it (those that loaded
        it, and those whose answer never came: it may still arrive)."""
        if not clients:
            return
        outcomes = await self._ask_all(lambda rid: UnloadLoRA(request_id=rid, lora_name=lora.name), clients)
        for client, outcome in outcomes:
            if isinstance(outcome, Exception):
                logger.warning("worker %s may keep the refused LoRA adapter %r: %s", client.worker_id,
                               lora.name, _describe(outcome))  # fmt: skip


def _ok(outcome: Outcome) -> bool:
    return isinstance(outcome, LoRAResult) and outcome.ok


def _refused(client: WorkerClient, refusal: LoRAResult | ErrorMessage) -> OpenAIError:
    """The client's error for a worker's refusal: the worker's status when it blames the
    adapter (4xx), else 500, with the worker's words."""
    status = refusal.code if 400 <= refusal.code < 500 else 500
    if status == 500:
        logger.warning("worker %s failed to load a LoRA adapter: %s", client.worker_id, refusal.message)
    return OpenAIError(status, refusal.message)


def _why_none(outcomes: list[tuple[WorkerClient, Outcome]]) -> str:
    if not outcomes:
        return "none is connected"
    return "; ".join(f"{client.worker_id}: {_describe(outcome)}" for client, outcome in outcomes)


def _describe(outcome: Outcome) -> str:
    if isinstance(outcome, TimeoutError):
        return f"no answer within --worker-reply-timeout ({outcome})"
    if isinstance(outcome, LoRAResult | ErrorMessage):
        return f"{outcome.code}: {outcome.message}"
    return str(outcome)
