"""A producer's side channel answers every malformed message with an error and goes on
serving: nothing a peer sends can stop it or make it read outside its cache."""

from __future__ import annotations

import uuid

import msgpack
import pytest
import torch
import zmq
from conftest import PRODUCER_BLOCKS
from kv_transfer_harness import block_content, local_cache, wait_pull

REPLY_TIMEOUT_MS = 5000


def packb(message) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


VALID_HANDSHAKE_PREFIX = packb(
    {"type": "handshake", "xid": 1, "version": 1, "engine_id": "probe", "compat_hash": "0" * 64}
)

MALFORMED = [
    (b"\xc1", None, "not a msgpack message"),  # 0xc1 is never valid msgpack
    (VALID_HANDSHAKE_PREFIX[:-9], None, "not a msgpack message"),  # a truncated frame
    (packb([1, 2, 3]), None, "must be a msgpack map"),
    (packb({"xid": 3}), 3, "string field 'type'"),
    (packb({"type": "steal", "xid": 4}), 4, "unknown message type"),
    (packb({"type": "read", "xid": 5, "request_id": "r", "block_ids": "1,2"}), 5, "list of integers"),
    (packb({"type": "read", "xid": 6, "request_id": "r", "block_ids": [1, "2"]}), 6, "integers only"),
    (packb({"type": "read", "xid": 7, "request_id": "r", "block_ids": [PRODUCER_BLOCKS]}), 7, "outside"),
    (packb({"type": "read", "xid": 8, "request_id": "r", "block_ids": [-1]}), 8, "outside"),
    (
        packb({"type": "read", "xid": 9, "request_id": 17, "block_ids": [1]}),
        9,
        "'request_id' must be a string",
    ),
    (
        packb({"type": "read", "xid": 10, "request_id": "never-exported", "block_ids": [1]}),
        10,
        "holds no blocks",
    ),
    (packb({"type": "handshake", "xid": 11, "version": 99}), 11, "version"),
    (VALID_HANDSHAKE_PREFIX[:-1] + b"\x85", None, "not a msgpack message"),
    (
        packb(
            {
                "type": "handshake",
                "xid": 12,
                "version": 1,
                "engine_id": "p",
                "compat_hash": "h",
                "kv_spec": {},
            }
        ),
        12,
        "kv_spec lacks",
    ),
    (packb({"type": "done", "xid": 13}), 13, "'request_id' must be a string"),
    (packb({"type": "done", "xid": 14, "request_id": "x" * 100_000}), 14, "characters"),
]


@pytest.fixture
def probe():
    context = zmq.Context()
    sockets = []

    def connect(address, kind=zmq.DEALER):
        sock = context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://{address[0]}:{address[1]}")
        sockets.append(sock)
        return sock

    yield connect
    for sock in sockets:
        sock.close(linger=0)
    context.term()


def answer(sock, *frames) -> dict:
    sock.send_multipart(list(frames))
    assert sock.poll(REPLY_TIMEOUT_MS), "the producer did not answer"
    reply = sock.recv_multipart()
    return msgpack.unpackb(reply[-1] if reply[0] == b"" else reply[0], raw=False)


def test_malformed_messages_get_error_replies_and_the_producer_keeps_serving(
    producers, connector_name, consumer, kv_spec, probe
):
    producer = producers.get(connector_name)
    dealer = probe(producers.addresses[producer])
    rejected_before = producers.process.stats(producer)["num_rejected_messages"]

    for frame, xid, expected in MALFORMED:
        reply = answer(dealer, frame)
        assert reply["type"] == "error", (frame[:40], reply)
        assert expected in reply["message"], (frame[:40], reply["message"])
        assert reply["xid"] == xid

    reply = answer(dealer, packb({"type": "done", "xid": 20, "request_id": "r"}), b"a second frame")
    assert reply["type"] == "error" and "one message frame" in reply["message"]

    # reading another request's blocks, or more blocks than the request holds, is refused
    rid = new_request_id()
    producers.process.export(producer, rid, [24], num_tokens=4)
    reply = answer(dealer, packb({"type": "read", "xid": 21, "request_id": rid, "block_ids": [24, 25]}))
    assert reply["type"] == "error" and "do not belong" in reply["message"]

    assert producers.process.stats(producer)["num_rejected_messages"] == rejected_before + len(MALFORMED) + 2

    # after all that, a real pull still works
    params = producers.process.export(producer, new_request_id(), [26, 27], num_tokens=8)
    consumer.start_pull(params["remote_request_id"], params, [1, 2], [26, 27])
    assert wait_pull(consumer, params["remote_request_id"]) is None
    assert torch.equal(local_cache(consumer)[2], block_content(kv_spec, 27))


def test_an_oversized_message_is_dropped_unanswered_and_the_producer_keeps_serving(
    producers, connector_name, probe
):
    producer = producers.get(connector_name)
    address = producers.addresses[producer]
    flooder = probe(address)
    flooder.send(b"\x00" * (2 << 20))
    assert not flooder.poll(300)
    reply = answer(probe(address), packb({"type": "done", "xid": 1, "request_id": "nothing-here"}))
    assert reply == {"type": "ok", "xid": 1, "released": False}


def test_a_req_socket_gets_answers_in_its_envelope(producers, connector_name, probe):
    producer = producers.get(connector_name)
    req = probe(producers.addresses[producer], zmq.REQ)
    req.send(packb({"type": "done", "request_id": "nothing-here"}))
    assert req.poll(REPLY_TIMEOUT_MS)
    assert msgpack.unpackb(req.recv(), raw=False) == {"type": "ok", "xid": None, "released": False}
    req.send(b"\xc1")
    assert req.poll(REPLY_TIMEOUT_MS)
    assert msgpack.unpackb(req.recv(), raw=False)["type"] == "error"


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:10]}"
