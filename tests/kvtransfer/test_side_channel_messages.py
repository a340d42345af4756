"""Side-channel messages and kv_transfer_params: what passes the checks is well formed,
and anything else raises MessageError (ValueError for params), never another error."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtransfer.kv_cache_spec import KVCacheSpec
from kvtransfer.side_channel import (
    DoneRequest,
    HandshakeReply,
    HandshakeRequest,
    MessageError,
    NixlAgentInfo,
    ReadRequest,
    decode,
    encode,
    parse_request,
)
from kvtransfer.transfer_params import RemoteBlocks

NUM_BLOCKS = 32
SPEC = KVCacheSpec("m", "bfloat16", num_kv_heads=3, head_size=64, num_layers=30, block_size=16)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["handshake", "read", "done", "blocks", ""]) | st.text(max_size=8)},
    optional={
        "xid": values,
        "version": st.just(1) | values,
        "engine_id": st.text(min_size=1, max_size=8) | values,
        "compat_hash": st.text(min_size=1, max_size=8) | values,
        "kv_spec": st.just(SPEC.to_dict()) | values,
        "request_id": st.text(min_size=1, max_size=8) | values,
        "block_ids": st.lists(st.integers(-3, NUM_BLOCKS + 3), max_size=6) | values,
    },
)


@settings(max_examples=300, deadline=None)
@given(messages)
def test_any_message_is_either_parsed_into_a_valid_request_or_rejected_with_message_error(message):
    try:
        request = parse_request(decode(encode(message)), NUM_BLOCKS)
    except MessageError:
        return
    assert isinstance(request, HandshakeRequest | ReadRequest | DoneRequest)
    if isinstance(request, ReadRequest):
        assert all(isinstance(b, int) and 0 <= b < NUM_BLOCKS for b in request.block_ids)
        assert isinstance(request.request_id, str) and request.request_id
    if isinstance(request, HandshakeRequest):
        assert request.kv_spec == SPEC


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_either_decode_to_a_typed_map_or_raise_message_error(frame):
    try:
        message = decode(frame)
    except MessageError:
        return
    assert isinstance(message, dict) and isinstance(message["type"], str)


def test_requests_survive_the_round_trip():
    handshake = HandshakeRequest("engine-a", SPEC.compat_hash(), SPEC, xid=7)
    assert parse_request(decode(encode(handshake.to_message())), NUM_BLOCKS) == handshake
    read = ReadRequest("r1", [1, 31], xid=8)
    assert parse_request(decode(encode(read.to_message())), NUM_BLOCKS) == read
    done = DoneRequest("r1")
    assert parse_request(decode(encode(done.to_message())), NUM_BLOCKS) == done


def test_a_handshake_reply_survives_the_round_trip_and_carries_no_pickle():
    reply = HandshakeReply(
        engine_id="e",
        instance_id="i",
        compat_hash=SPEC.compat_hash(),
        kv_spec=SPEC,
        num_blocks=100,
        block_len=4096,
        tp_size=1,
        connector="NixlConnector",
        nixl=NixlAgentInfo("agent", b"\x00metadata", base_addr=1 << 40, device_id=0, mem_type="DRAM"),
        xid=3,
    )
    frame = encode(reply.to_message())
    assert HandshakeReply.from_message(decode(frame)) == reply
    # plain msgpack: a reader with no extension types gets back only maps, strings, numbers, bytes
    msgpack.unpackb(frame, raw=False, ext_hook=lambda code, data: pytest.fail("extension type"))


def test_a_handshake_reply_whose_region_overflows_the_address_space_is_refused():
    message = HandshakeReply(
        "e",
        "i",
        SPEC.compat_hash(),
        SPEC,
        num_blocks=1 << 30,
        block_len=1 << 30,
        tp_size=1,
        connector="NixlConnector",
        nixl=NixlAgentInfo("a", b"m", (1 << 64) - (1 << 20), 0, "DRAM"),
    ).to_message()
    with pytest.raises(MessageError, match="address space"):
        HandshakeReply.from_message(decode(encode(message)))


def test_a_handshake_of_another_protocol_version_is_refused_with_advice():
    message = {**HandshakeRequest("e", "h", SPEC).to_message(), "version": 2}
    with pytest.raises(MessageError, match="same pdserve release"):
        parse_request(message, NUM_BLOCKS)


def test_transfer_params_survive_the_round_trip():
    remote = RemoteBlocks("e", "10.0.0.1", 14579, "r", [4, 5], 30, 1, 1.8e9, "inst")
    assert RemoteBlocks.from_params(remote.to_params()) == remote


def test_vllm_style_params_without_pdserve_extras_are_accepted():
    params = {
        "do_remote_prefill": True,
        "remote_engine_id": "e",
        "remote_host": "h",
        "remote_port": 1,
        "remote_request_id": "r",
        "remote_block_ids": [1],
    }
    remote = RemoteBlocks.from_params(params)
    assert (remote.tp_size, remote.num_tokens, remote.expiry_time, remote.instance_id) == (1, 0, None, None)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"remote_port": "14579"}, "remote_port"),
        ({"remote_port": 70000}, "remote_port"),
        ({"remote_block_ids": [1, None]}, "remote_block_ids"),
        ({"remote_host": ""}, "remote_host"),
        ({"remote_blocks_expiry_time": float("nan")}, "remote_blocks_expiry_time"),
        ({"tp_size": 0}, "tp_size"),
    ],
)
def test_malformed_transfer_params_are_refused_naming_the_field(change, complaint):
    params = RemoteBlocks("e", "h", 1, "r", [1], 4, 1).to_params()
    with pytest.raises(ValueError, match=complaint):
        RemoteBlocks.from_params({**params, **change})


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(list(RemoteBlocks("e", "h", 1, "r", [1], 4, 1).to_params())), values))
def test_any_params_either_parse_or_raise_value_error(params):
    try:
        RemoteBlocks.from_params(params)
    except ValueError:
        pass
