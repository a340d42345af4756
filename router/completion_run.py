"""Running one API request's choices through the workers and shaping what the client gets.

A PreparedRequest holds one SequenceSpec per choice (n samples of each prompt). A
CompletionRun starts one task per choice; each feeds its worker deltas through the
choice's RequestText (incremental detokenization, stop strings, logprob strings) and
ends the worker request as soon as its text is finished: a stop string matched here
closes the orchestrator's generator, which aborts the request on the worker. The
choices' deltas are merged in arrival order, and then either collected into one
response body or framed as server-sent events, with the usage chunk before
`data: [DONE]` when asked. A streamed chat request with a reader (reasoning, tool calls)
has one ChoiceStream per choice, which turns each delta's text into the message's pieces.
If the stream is dropped (client gone), every choice still running is cancelled, which
aborts it on its worker. Torch-free.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from common.engine.outputs import RequestOutput, TokenLogprobs
from common.openai_api import (
    SSE_DONE,
    OpenAIError,
    PreparedRequest,
    ServedModel,
    chat_chunk,
    chat_completion_response,
    completion_chunk,
    completion_response,
    sse,
    sse_error,
    usage_chunk,
)
from common.openai_api.chat_output import ChatDelta
from common.output_processor import RequestText, TextDelta, TokenStrings
from common.protocol import TokenDelta
from router.metrics import RouterMetrics
from router.orchestrator import Orchestrator

logger = logging.getLogger(__name__)

_CHOICE_DONE = object()


class CompletionRun:
    def __init__(
        self,
        prepared: PreparedRequest,
        orchestrator: Orchestrator,
        served: ServedModel,
        metrics: RouterMetrics | None = None,
        token_strings: TokenStrings | None = None,
    ) -> None:
        self.prepared = prepared
        self.orchestrator = orchestrator
        self.served = served
        self.metrics = metrics
        self.arrival = time.monotonic()
        strings = token_strings or TokenStrings(served.tokenizer)
        self.outputs = [
            RequestText(spec.request_id, spec.prompt_token_ids, prepared.options, served.tokenizer, strings)
            for spec in prepared.sequences
        ]

    # -- the merged deltas ---------------------------------------------------------------

    async def deltas(self) -> AsyncIterator[tuple[int, TextDelta]]:
        """(choice position, delta) as they come; OpenAIError when a choice fails."""
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._run_choice(position, queue), name=f"choice-{spec.request_id}")
            for position, spec in enumerate(self.prepared.sequences)
        ]
        remaining = len(tasks)
        try:
            while remaining:
                position, item = await queue.get()
                if item is _CHOICE_DONE:
                    remaining -= 1
                elif isinstance(item, OpenAIError):
                    raise item
                else:
                    yield position, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _run_choice(self, position: int, queue: asyncio.Queue[tuple[int, Any]]) -> None:
        spec = self.prepared.sequences[position]
        text = self.outputs[position]
        timer = self.metrics.request_started() if self.metrics is not None else None
        if timer is not None:
            timer.arrival = self.arrival
        try:
            prepared = self.prepared
            generate = self.orchestrator.generate(spec, prepared.priority, prepared.cache_salt, prepared.lora)
            async with aclosing(generate) as messages:
                async for message in messages:
                    if timer is not None:
                        timer.tokens_arrived(len(message.token_ids))
                    delta = text.update(_as_output(message))
                    if delta is not None:
                        queue.put_nowait((position, delta))
                    if text.finished:
                        break  # leaving the block aborts the worker request if it still runs
            if not text.finished:
                raise OpenAIError(500, "the worker ended the request without a finish reason")
            if timer is not None:
                timer.finished(text.finish_reason or "abort", len(spec.prompt_token_ids), len(text.token_ids))
        except OpenAIError as error:
            if self.metrics is not None:
                self.metrics.requests_failed.labels(str(error.status)).inc()
            queue.put_nowait((position, error))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must fail this request, never the server
            logger.exception("choice %s failed", spec.request_id)
            queue.put_nowait(
                (position, OpenAIError(500, f"internal error in the router: {type(exc).__name__}: {exc}"))
            )
        finally:
            queue.put_nowait((position, _CHOICE_DONE))

    # -- whole responses -----------------------------------------------------------------

    async def response(self) -> dict[str, Any]:
        """The whole response body once every choice has finished; OpenAIError on failure."""
        async with aclosing(self.deltas()) as deltas:
            async for _ in deltas:
                pass
        details = self.served.enable_prompt_tokens_details
        if self.prepared.kind == "chat":
            return chat_completion_response(
                self.prepared, self.outputs, details, role=self.served.response_role
            )
        return completion_response(self.prepared, self.outputs, details)

    # -- server-sent events -----------------------------------------------------------------

    async def events(self) -> AsyncIterator[str]:
        """The SSE stream: chunks, the usage chunk if asked, then [DONE]; an error event
        then [DONE] if a choice fails."""
        prepared = self.prepared
        request = prepared.request
        include_usage = request.stream_options is not None and request.stream_options.include_usage
        continuous_usage = (
            request.stream_options is not None and request.stream_options.continuous_usage_stats
        )
        sent_any = [False] * len(self.outputs)
        text_sent = [0] * len(self.outputs)
        reader = prepared.reader if prepared.kind == "chat" else None
        streams = [reader.stream() for _ in self.outputs] if reader is not None else None
        try:
            async with aclosing(self.deltas()) as deltas:
                async for position, delta in deltas:
                    first = not sent_any[position]
                    message, finish_reason = None, None
                    if streams is not None:
                        stream = streams[position]
                        message = stream.feed(delta.text, final=delta.finished)
                        finish_reason = stream.finish_reason(delta.finish_reason) if delta.finished else None
                    if not first and _nothing_to_show(delta, message, request.return_token_ids):
                        continue
                    chunk = self._chunk(position, delta, first, text_sent[position], message, finish_reason)
                    if continuous_usage:
                        chunk["usage"] = self._choice_usage(position)
                    sent_any[position] = True
                    text_sent[position] += len(delta.text) + len(self._echo_prefix(position) if first else "")
                    yield sse(chunk)
            if include_usage:
                yield sse(usage_chunk(prepared, self.outputs, self.served.enable_prompt_tokens_details))
        except OpenAIError as error:
            yield sse_error(error)
        except Exception as exc:  # a bug: the client still gets an error event and [DONE]
            logger.exception("streaming %s failed", prepared.id)
            yield sse_error(OpenAIError(500, f"internal error in the router: {type(exc).__name__}: {exc}"))
        yield SSE_DONE

    def _chunk(
        self,
        position: int,
        delta: TextDelta,
        first: bool,
        text_offset: int,
        message: ChatDelta | None = None,
        finish_reason: str | None = None,
    ) -> dict[str, Any]:
        index = self.prepared.sequences[position].index
        if self.prepared.kind == "chat":
            return chat_chunk(
                self.prepared, index, delta, first, message, finish_reason, role=self.served.response_role
            )
        prefix = self._echo_prefix(position) if first else ""
        return completion_chunk(self.prepared, index, delta, text_offset=text_offset, text_prefix=prefix)

    def _echo_prefix(self, position: int) -> str:
        request = self.prepared.request
        if self.prepared.kind != "completion" or not getattr(request, "echo", False):
            return ""
        prompt = self.prepared.prompts[self.prepared.sequences[position].prompt_index]
        return prompt.text or ""

    def _choice_usage(self, position: int) -> dict[str, int]:
        prompt_tokens = len(self.prepared.sequences[position].prompt_token_ids)
        completion_tokens = len(self.outputs[position].token_ids)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }


def _nothing_to_show(delta: TextDelta, message: ChatDelta | None, return_token_ids: bool) -> bool:
    """A delta whose text is held back (a stop string may still match, or a tool call is
    still being written) and that carries nothing else the client asked for."""
    return (
        (not delta.text if message is None else message.empty)
        and delta.finish_reason is None
        and not delta.logprobs
        and not (return_token_ids and delta.token_ids)
    )


def _as_output(message: TokenDelta) -> RequestOutput:
    """A worker's TokenDelta as the output processor reads engine outputs."""
    logprobs = None
    if message.logprobs is not None:
        try:
            logprobs = [
                TokenLogprobs(
                    int(row[0]), float(row[1]), int(row[2]), [(int(t), float(v)) for t, v in row[3]]
                )
                for row in message.logprobs
            ]
        except (TypeError, ValueError, IndexError):
            raise OpenAIError(
                500,
                "a worker sent malformed logprobs (rows must be [token_id, logprob, rank, [[id, logprob], ...]])",
            ) from None
    return RequestOutput(
        request_id=message.request_id,
        new_token_ids=list(message.token_ids),
        new_logprobs=logprobs,
        finished=message.finish_reason is not None,
        finish_reason=message.finish_reason,
        stop_reason=message.stop_reason,
        num_prompt_tokens=message.num_prompt_tokens,
        num_cached_tokens=message.num_cached_tokens,
    )
