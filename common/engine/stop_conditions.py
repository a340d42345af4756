"""Whether a request is done after its newest token: EOS, stop token ids, its grammar
finished, or a length limit.

Stop strings are not here: they need text, which the router (or the batch front end)
checks and answers with an abort.
"""

from __future__ import annotations

from common.engine.request import Request, RequestStatus


def check_stop(request: Request, max_model_len: int) -> RequestStatus | None:
    """The finished status the newest output token puts the request in, or None to go on.

    A stop token (EOS unless ignore_eos, or one of stop_token_ids) counts only once
    min_tokens outputs exist, and wins over a length limit reached by the same token, so
    a model that ended on its own reads "stop". Sets request.stop_reason for stop_token_ids.
    A complete grammar lets only EOS through its mask, and the EOS it takes ends the request
    ("stop"), min_tokens and ignore_eos or not, as vLLM ends it; a token the grammar refused
    aborts it. (A "stop" request's last token is never text: the grammar's last token, a
    closing brace, must not end it.)
    """
    params = request.sampling_params
    num_output = request.num_output_tokens
    grammar = request.active_grammar
    if grammar is not None and num_output > 0:
        if request.grammar_refused:
            return RequestStatus.FINISHED_ABORTED
        if grammar.is_terminated() and request.all_token_ids[-1] in grammar.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
    if num_output >= params.min_tokens and num_output > 0:
        last = request.all_token_ids[-1]
        if last == request.eos_token_id and not params.ignore_eos:
            return RequestStatus.FINISHED_STOPPED
        if last in params.stop_token_ids:
            request.stop_reason = last
            return RequestStatus.FINISHED_STOPPED
    if num_output >= params.max_tokens or request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None
