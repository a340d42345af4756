"""The serving loop packs each step's TokenDelta straight from the engine output: the bytes
must be exactly what encode_message gives for the same TokenDelta, which routers decode."""

from __future__ import annotations

import pytest

from common.engine.outputs import RequestOutput, TokenLogprobs
from common.protocol import TokenDelta, decode_message, encode_message
from common.worker.engine_server import encode_delta


def output(request_id: str, token_ids: list[int], **fields) -> RequestOutput:
    base = dict(new_logprobs=None, finished=False, finish_reason=None, stop_reason=None, num_prompt_tokens=7)
    return RequestOutput(request_id, token_ids, **{**base, "num_cached_tokens": 0, **fields})


OUTPUTS = [
    output("cmpl-1-0", [17], num_prompt_tokens=9),
    output(
        "cmpl-2-0",
        [5, 2],
        new_logprobs=[
            TokenLogprobs(5, -0.25, 1, [(5, -0.25), (8, -1.5)]),
            TokenLogprobs(2, -3.0, 4, [(1, -0.5)]),
        ],
        finished=True,
        finish_reason="stop",
        stop_reason=2,
        num_prompt_tokens=12,
        num_cached_tokens=8,
    ),
    output(
        "prefill-3",
        [40],
        finished=True,
        num_prompt_tokens=33,
        kv_transfer_params={"engine_id": "e0", "block_ids": [3, 4, 5], "first_token_id": 40},
    ),
    output("cmpl-4-0", [], finished=True, finish_reason="abort"),
]


@pytest.mark.parametrize("out", OUTPUTS, ids=lambda out: out.request_id)
def test_encoded_delta_is_the_token_delta_message(out: RequestOutput) -> None:
    expected = TokenDelta(
        request_id=out.request_id,
        token_ids=list(out.new_token_ids),
        logprobs=None
        if out.new_logprobs is None
        else [[lp.token_id, lp.logprob, lp.rank, [list(pair) for pair in lp.top]] for lp in out.new_logprobs],
        finish_reason=out.finish_reason,
        stop_reason=out.stop_reason,
        num_prompt_tokens=out.num_prompt_tokens,
        num_cached_tokens=out.num_cached_tokens,
        kv_transfer_params=out.kv_transfer_params,
    )
    frame = encode_delta(out)
    assert frame == encode_message(expected)
    assert decode_message(frame) == expected
