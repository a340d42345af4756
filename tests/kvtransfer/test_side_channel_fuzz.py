"""Hypothesis-generated frames to a real producer's KV side channel (the TcpConnector
producer in the test producer process): random bytes, random msgpack values, truncated
and mutated handshake / read / done messages. The side channel answers each with an
error, or with the protocol's reply when the frame happens to be a valid request; it
never stops serving, never reads outside the cache, and a real pull works afterwards.
The hand-written malformed messages are in test_side_channel_robustness.py."""

from __future__ import annotations

import uuid

import msgpack
import pytest
import torch
import zmq
from conftest import PRODUCER_BLOCKS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kv_transfer_harness import block_content, local_cache, wait_pull

from kvtransfer.side_channel import MAX_REQUEST_BYTES

REPLY_TIMEOUT_MS = 5000
CONNECTOR = "TcpConnector"
REPLY_TYPES = {"error", "ok", "handshake", "blocks"}


def packb(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


@pytest.fixture(scope="module")
def channel(producers, kv_spec):
    """A DEALER on the producer's side channel, and the producer's key."""
    producer = producers.get(CONNECTOR)
    host, port = producers.addresses[producer]
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://{host}:{port}")
    yield dealer, producer
    dealer.close(linger=0)
    context.term()


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=16)
    | st.binary(max_size=16),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=16,
)  # fmt: skip
FIELDS = ["type", "xid", "version", "engine_id", "compat_hash", "kv_spec", "request_id", "block_ids"]


def valid_messages(kv_spec) -> list[dict]:
    return [
        {"type": "handshake", "xid": 1, "version": 1, "engine_id": "fuzz", "compat_hash": kv_spec.compat_hash(),
         "kv_spec": kv_spec.to_dict()},
        {"type": "read", "xid": 2, "request_id": "fuzz-read", "block_ids": [1, 2]},
        {"type": "done", "xid": 3, "request_id": "fuzz-done"},
    ]  # fmt: skip


@st.composite
def mutated(draw, kv_spec) -> bytes:
    message = dict(draw(st.sampled_from(valid_messages(kv_spec))))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["replace", "drop", "add", "block_ids"]))
        if action == "replace":
            message[draw(st.sampled_from(FIELDS))] = draw(values)
        elif action == "drop":
            message.pop(draw(st.sampled_from(FIELDS)), None)
        elif action == "add":
            message[draw(st.text(max_size=8))] = draw(values)
        else:  # block ids around the cache's bounds
            message["block_ids"] = draw(
                st.lists(st.integers(-2, PRODUCER_BLOCKS + 2) | st.integers(-(2**63), 2**64 - 1), max_size=8)
            )
    frame = packb(message)
    if draw(st.booleans()):
        return frame
    return frame[: draw(st.integers(0, len(frame)))]  # truncated


def frames(kv_spec):
    return st.binary(max_size=128) | values.map(packb) | mutated(kv_spec)


def ask(dealer, *frames: bytes) -> list[bytes] | None:
    dealer.send_multipart(list(frames))
    if not dealer.poll(REPLY_TIMEOUT_MS):
        return None
    return dealer.recv_multipart()


def test_generated_frames_get_a_protocol_reply_and_the_channel_keeps_serving(channel, producers, kv_spec):
    dealer, producer = channel
    rejected_before = producers.process.stats(producer)["num_rejected_messages"]
    sent = {"n": 0, "errors": 0}

    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(frame=frames(kv_spec))
    def check(frame):
        reply = ask(dealer, frame)
        assert reply is not None, f"no answer to {frame[:60]!r}"
        # an empty first frame reads as a REQ socket's envelope, and the reply keeps it
        header = msgpack.unpackb(reply[1] if reply[0] == b"" else reply[0], raw=False)
        assert header["type"] in REPLY_TYPES, header
        if header["type"] == "error":
            assert isinstance(header["message"], str) and header["message"]
            sent["errors"] += 1
        if header["type"] == "blocks":  # only ever blocks leased to that request: none here
            pytest.fail(f"the producer served blocks nobody leased: {header}")
        sent["n"] += 1

    check()
    assert sent["n"] >= 400
    assert producers.process.stats(producer)["num_rejected_messages"] == rejected_before + sent["errors"]


def test_messages_in_several_frames_and_oversized_ones_do_not_stop_it(channel):
    dealer, _ = channel
    reply = ask(dealer, packb({"type": "done", "request_id": "x"}), b"\x00", b"\x01")
    assert reply is not None and msgpack.unpackb(reply[0], raw=False)["type"] == "error"
    dealer.send(b"\xc1" * (MAX_REQUEST_BYTES + 1))  # dropped unread by the socket
    assert not dealer.poll(300)


def test_after_the_fuzzing_a_real_pull_still_works(channel, producers, kv_spec):
    _, producer = channel
    from kv_transfer_harness import make_consumer

    consumer = make_consumer(CONNECTOR, kv_spec)
    try:
        rid = f"after-fuzz-{uuid.uuid4().hex[:8]}"
        params = producers.process.export(producer, rid, [5, 6], num_tokens=8)
        consumer.start_pull(params["remote_request_id"], params, [1, 2], [5, 6])
        assert wait_pull(consumer, params["remote_request_id"]) is None
        assert torch.equal(local_cache(consumer)[2], block_content(kv_spec, 6))
    finally:
        consumer.close()
