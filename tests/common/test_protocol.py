"""Router↔worker messages: round trips, and every malformed frame refused with ProtocolError."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.protocol import (
    Abort,
    ErrorMessage,
    GenerateRequest,
    Hello,
    LoadReport,
    ProtocolError,
    TokenDelta,
    decode_message,
    encode_message,
    sampling_params_to_wire,
)
from common.sampling_params import SamplingParams


def _generate(**overrides):
    params = SamplingParams(max_tokens=8, temperature=0.0, logit_bias={5: -1.0}, stop_token_ids=[2])
    fields = dict(request_id="r1", prompt_token_ids=[1, 2, 3], sampling_params=sampling_params_to_wire(params))
    fields.update(overrides)
    return GenerateRequest(**fields)


@pytest.mark.parametrize(
    "msg",
    [
        _generate(),
        _generate(kv_transfer_params={"remote_block_ids": [1, 2]}, prefill_only=True, cache_salt="s"),
        Abort("r1"),
        TokenDelta("r1", [5, 6], logprobs=[[5, -0.1, 1, [[5, -0.1]]]], finish_reason="stop", stop_reason=2),
        ErrorMessage("r1", 400, "bad"),
        Hello("router-1"),
        LoadReport("w1", "decode", "e1", 3, 1, 100, 0.25, block_size=16, kv_events_endpoint="tcp://h:5557"),
    ],
)
def test_messages_round_trip(msg):
    assert decode_message(encode_message(msg)) == msg


def test_sampling_params_survive_the_wire():
    params = SamplingParams(max_tokens=8, temperature=0.7, seed=3, logit_bias={5: -1.0}, logprobs=2)
    assert _generate(sampling_params=sampling_params_to_wire(params)).sampling() == params


def _frame(body) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


GOOD = {"type": "generate", "request_id": "r", "prompt_token_ids": [1], "sampling_params": {}}
LOAD = {"type": "load", "worker_id": "w", "role": "decode", "num_running": 1, "num_waiting": 0,
        "kv_cache_usage": 0.5, "num_queued_prefill_tokens": 0}  # fmt: skip


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",
        _frame([1, 2]),
        _frame({"type": "nope", "request_id": "r"}),
        _frame({"request_id": "r"}),
        _frame({**GOOD, "extra_field": 1}),
        _frame({**GOOD, "prompt_token_ids": []}),
        _frame({**GOOD, "prompt_token_ids": [-1]}),
        _frame({**GOOD, "prompt_token_ids": ["a"]}),
        _frame({**GOOD, "prompt_token_ids": [True]}),
        _frame({**GOOD, "request_id": 5}),
        _frame({**GOOD, "sampling_params": {"max_tokens": "8"}}),
        _frame({**GOOD, "sampling_params": {"temperature": None}}),
        _frame({**GOOD, "sampling_params": {"bogus": 1}}),
        _frame({**GOOD, "sampling_params": {"logit_bias": {"5": 1.0}}}),
        _frame({**GOOD, "priority": 1.5}),
        _frame({**GOOD, "kv_transfer_params": [1]}),
        _frame({"type": "abort"}),
        _frame({"type": "hello", "router_id": 7}),
        _frame({"type": "delta", "request_id": "r", "token_ids": [1], "finish_reason": "exploded"}),
        _frame({"type": "error", "request_id": "r", "code": "500", "message": "x"}),
        _frame({**LOAD, "kv_cache_usage": "full"}),
        _frame({**LOAD, "role": "both"}),
        _frame({**LOAD, "num_kv_blocks": -1}),
        _frame({**LOAD, "extra": {"block_size": 16}}),
        _frame({k: v for k, v in LOAD.items() if k != "num_running"}),
    ],
)
def test_malformed_frames_are_refused(frame):
    with pytest.raises(ProtocolError):
        decode_message(frame)


def test_a_minimal_load_frame_is_a_load_report():
    assert decode_message(_frame(LOAD)) == LoadReport(
        worker_id="w", role="decode", num_running=1, kv_cache_usage=0.5
    )


@given(st.binary(max_size=256))
def test_random_bytes_never_crash_the_decoder(data):
    try:
        decode_message(data)
    except ProtocolError:
        pass
