"""From the engine's token ids to the text a client sees, one request at a time.

The engine knows only token ids; text lives here. Per request: incremental
detokenization, stop strings (the text is cut there and the engine request must be
aborted, since the engine cannot see them), logprobs with their token strings, the
accumulated text for a whole response, and deltas for streaming that never show text
a stop string may still cut.

Torch-free: the router runs this on the token deltas its decode workers send.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.tokenizer import IncrementalDetokenizer, StopChecker

if TYPE_CHECKING:
    from common.engine.outputs import RequestOutput, TokenLogprobs


@dataclass(frozen=True)
class OutputOptions:
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logprobs: bool = False  # keep each token's logprob entry (the engine was asked for them)
    return_tokens_as_token_ids: bool = False  # show tokens as "token_id:123" instead of text


@dataclass
class LogprobEntry:
    """One generated token's logprob, with the strings the API shows."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]  # the k most likely: (token id, token string, logprob), best first


@dataclass
class TextDelta:
    """What one engine step added to one request, ready to stream."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[LogprobEntry] | None
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None  # the stop token id or stop string that ended it


class TokenStrings:
    """Each token id's own text, as logprobs show it; cached, since the vocabulary is bounded."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int, as_token_id: bool = False) -> str:
        if as_token_id:
            return f"token_id:{token_id}"
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


class RequestText:
    """One request's output so far: token ids, text, logprobs, and how it finished."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: OutputOptions,
        tokenizer: Any,
        token_strings: TokenStrings | None = None,
    ):
        self.request_id = request_id
        self.num_prompt_tokens = len(prompt_token_ids)
        self.options = options
        self.token_ids: list[int] = []
        self.logprobs: list[LogprobEntry] | None = [] if options.logprobs else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_cached_tokens = 0
        self.stopped_by_string = False  # the engine request is still running and must be aborted
        self.error: str | None = None  # why the engine failed the request ("abort" with a reason)
        self._detokenizer = IncrementalDetokenizer(
            tokenizer,
            prompt_token_ids,
            skip_special_tokens=options.skip_special_tokens,
            spaces_between_special_tokens=options.spaces_between_special_tokens,
        )
        self._stops = StopChecker(options.stop, options.include_stop_str_in_output)
        self._token_strings = token_strings or TokenStrings(tokenizer)

    @property
    def text(self) -> str:
        """The output text so far (cut at the stop string that ended it, if one did)."""
        return self._stops.text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, output: RequestOutput) -> TextDelta | None:
        """Take one engine step's output; None when the request had already finished here."""
        if self.finished:
            return None  # the engine's last steps after a stop string, before its abort landed
        new_ids = list(output.new_token_ids)
        self.token_ids.extend(new_ids)
        self.num_cached_tokens = output.num_cached_tokens
        new_logprobs = self._logprob_entries(output.new_logprobs) if self.logprobs is not None else None
        if new_logprobs:
            self.logprobs.extend(new_logprobs)

        # the EOS or stop token that ended the request is not text, unless asked for
        ended_by_token = output.finished and output.finish_reason == "stop"
        text_ids = (
            new_ids[:-1]
            if ended_by_token and new_ids and not self.options.include_stop_str_in_output
            else new_ids
        )
        check = self._stops.step(self._detokenizer.step(text_ids, final=output.finished))
        shown = check.text
        if check.stopped:
            self.finish_reason, self.stop_reason = "stop", check.stop
            self.stopped_by_string = not output.finished
        elif output.finished:
            shown += self._stops.finish()  # text held back in case a stop string followed
            self.finish_reason, self.stop_reason = output.finish_reason, output.stop_reason
            self.error = output.error
        return TextDelta(
            request_id=self.request_id,
            text=shown,
            token_ids=new_ids,
            logprobs=new_logprobs,
            finished=self.finished,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )

    def _logprob_entries(self, logprobs: list[TokenLogprobs] | None) -> list[LogprobEntry]:
        if not logprobs:
            return []
        as_ids = self.options.return_tokens_as_token_ids
        strings = self._token_strings
        return [
            LogprobEntry(
                token_id=lp.token_id,
                token=strings(lp.token_id, as_ids),
                logprob=lp.logprob,
                top=[(tid, strings(tid, as_ids), value) for tid, value in lp.top],
            )
            for lp in logprobs
        ]


class OutputProcessor:
    """Routes engine outputs to their requests' RequestText and says which to abort."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._token_strings = TokenStrings(tokenizer)
        self._requests: dict[str, RequestText] = {}

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], options: OutputOptions
    ) -> RequestText:
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in flight; request ids must be unique")
        state = RequestText(request_id, prompt_token_ids, options, self._tokenizer, self._token_strings)
        self._requests[request_id] = state
        return state

    def process_outputs(self, outputs: list[RequestOutput]) -> tuple[list[TextDelta], list[str]]:
        """The deltas of one engine step, and the ids whose engine requests a stop string ended.

        Finished requests are forgotten here; the caller keeps the RequestText that
        add_request returned for the final response.
        """
        deltas: list[TextDelta] = []
        to_abort: list[str] = []
        for output in outputs:
            state = self._requests.get(output.request_id)
            if state is None:
                continue  # aborted here already, or not ours
            delta = state.update(output)
            if delta is None:
                continue
            deltas.append(delta)
            if delta.finished:
                del self._requests[output.request_id]
                if state.stopped_by_string:
                    to_abort.append(output.request_id)
        return deltas, to_abort

    def abort(self, request_id: str) -> None:
        """Forget a request the caller aborted (client gone, error elsewhere)."""
        self._requests.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._requests)
