"""The KV-event publisher: vLLM's frames read with plain msgpack, seq numbering, replay,
a queue that never blocks the engine, and where its sockets live."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
import zmq

from common.config.kv_events_config import KVEventsConfig
from common.kv_event_publisher import (
    KVEventPublisher,
    NullPublisher,
    binds,
    endpoint_for_rank,
    make_kv_event_publisher,
)
from common.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, decode_batch

END_MARKER_SEQ = b"\xff" * 8


def _config(**overrides) -> KVEventsConfig:
    values = dict(
        enable_kv_cache_events=True,
        endpoint="tcp://127.0.0.1:*",
        replay_endpoint="tcp://127.0.0.1:*",
    )
    values.update(overrides)
    return KVEventsConfig(**values)


def _stored(first_hash: int) -> BlockStored:
    return BlockStored(
        block_hashes=[first_hash, first_hash + 1],
        parent_block_hash=None,
        token_ids=list(range(8)),
        block_size=4,
        medium="GPU",
    )


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()


def _subscribe(ctx, publisher, topic=b""):
    """A SUB socket that is known to receive: publish throw-away batches until one arrives.

    Returns the socket and the seq of the last batch it saw.
    """
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(publisher.endpoint)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        publisher.publish([AllBlocksCleared()])
        if sub.poll(50):
            last = None
            while sub.poll(100):
                last = int.from_bytes(sub.recv_multipart()[1], "big")
            return sub, last
    raise AssertionError("the SUB socket never received anything")


def _wait_published(publisher, count: int) -> None:
    """Batches get their seq when the thread sends them; a replay only has those."""
    deadline = time.monotonic() + 10
    while publisher.num_published < count:
        assert time.monotonic() < deadline, f"only {publisher.num_published} of {count} batches sent"
        time.sleep(0.005)


def _replay(ctx, publisher, start: int) -> list[list[bytes]]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(publisher.replay_endpoint)
    dealer.send_multipart([b"", start.to_bytes(8, "big")])
    answers = []
    try:
        while True:
            assert dealer.poll(5000), "no answer from the replay socket"
            frames = dealer.recv_multipart()
            answers.append(frames)
            if frames[2] == END_MARKER_SEQ:
                return answers
    finally:
        dealer.close(linger=0)


def test_a_batch_arrives_as_topic_seq_and_a_payload_a_plain_msgpack_reader_understands(ctx):
    with KVEventPublisher(_config(topic="kv@worker-0"), context=ctx) as publisher:
        sub, last_seq = _subscribe(ctx, publisher, b"kv@worker-0")
        before = time.time()
        publisher.publish([_stored(7), BlockRemoved(block_hashes=[2**64 - 1], medium="GPU")])
        assert sub.poll(5000)
        topic, seq, payload = sub.recv_multipart()
        sub.close(linger=0)

    assert topic == b"kv@worker-0"
    assert len(seq) == 8 and int.from_bytes(seq, "big") == last_seq + 1
    ts, events = msgpack.unpackb(payload)  # no data_parallel_rank element when there is none
    assert before - 1 <= ts <= time.time() + 1
    assert events == [
        {
            "type": "BlockStored",
            "block_hashes": [7, 8],
            "parent_block_hash": None,
            "token_ids": list(range(8)),
            "block_size": 4,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": None,  # vLLM 0.33 declares it without a default
        },
        {"type": "BlockRemoved", "block_hashes": [2**64 - 1], "medium": "GPU"},
    ]


def test_seq_counts_from_zero_and_grows_by_one_per_batch(ctx):
    with KVEventPublisher(_config(), context=ctx) as publisher:
        for i in range(5):
            publisher.publish([_stored(10 * i)])
        _wait_published(publisher, 5)
        answers = _replay(ctx, publisher, 0)
    seqs = [int.from_bytes(frames[2], "big") for frames in answers[:-1]]
    assert seqs == [0, 1, 2, 3, 4]
    first_hashes = [msgpack.unpackb(frames[3])[1][0]["block_hashes"][0] for frames in answers[:-1]]
    assert first_hashes == [0, 10, 20, 30, 40]


def test_an_empty_step_publishes_nothing(ctx):
    with KVEventPublisher(_config(), context=ctx) as publisher:
        publisher.publish([])
        publisher.publish([_stored(1)])
        _wait_published(publisher, 1)
        answers = _replay(ctx, publisher, 0)
    assert [int.from_bytes(frames[2], "big") for frames in answers[:-1]] == [0]


def test_replay_answers_the_asked_range_with_topic_frames_then_the_end_marker(ctx):
    with KVEventPublisher(_config(topic="t"), context=ctx) as publisher:
        for i in range(6):
            publisher.publish([_stored(i)])
        _wait_published(publisher, 6)
        answers = _replay(ctx, publisher, 3)

    for frames, seq in zip(answers[:-1], (3, 4, 5), strict=True):
        assert frames[0] == b"" and frames[1] == b"t"
        assert frames[2] == seq.to_bytes(8, "big")
        assert msgpack.unpackb(frames[3])[1][0]["block_hashes"] == [seq, seq + 1]
    assert answers[-1] == [b"", b"", END_MARKER_SEQ, b""]
    assert int.from_bytes(answers[-1][2], "big", signed=True) == -1


def test_replay_frames_are_vllm_033s_as_a_router_socket_sends_them(ctx):
    """What leaves the ROUTER socket, seen from a raw ROUTER peer's side: a REQ client's
    request arrives as [identity, b"", seq8] and each answer is [identity, b"", topic, seq8,
    payload], then [identity, b"", b"", seq8 of -1, b""]; a REQ client reads them without the
    envelope, as vLLM's own replay client does."""
    with KVEventPublisher(_config(topic="kv"), context=ctx) as publisher:
        for i in range(3):
            publisher.publish([_stored(10 * i)])
        _wait_published(publisher, 3)
        req = ctx.socket(zmq.REQ)
        req.connect(publisher.replay_endpoint)
        try:
            req.send((1).to_bytes(8, "big"))
            assert req.poll(5000), "no answer from the replay socket"
            topic, seq, payload = req.recv_multipart()
            assert (topic, seq) == (b"kv", (1).to_bytes(8, "big"))
            assert decode_batch(payload).events == [_stored(10)]
        finally:
            req.close(linger=0)
        # a bare DEALER that leaves the delimiter out still gets every frame vLLM sends
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(publisher.replay_endpoint)
        try:
            dealer.send((2).to_bytes(8, "big"))
            answers = []
            while not answers or answers[-1][2] != END_MARKER_SEQ:
                assert dealer.poll(5000), "no answer from the replay socket"
                answers.append(dealer.recv_multipart())
        finally:
            dealer.close(linger=0)
    assert [frames[:3] for frames in answers] == [
        [b"", b"kv", (2).to_bytes(8, "big")],
        [b"", b"", END_MARKER_SEQ],
    ]
    assert answers[-1] == [b"", b"", (-1).to_bytes(8, "big", signed=True), b""]


def test_replay_keeps_only_the_last_buffer_steps_batches(ctx):
    with KVEventPublisher(_config(buffer_steps=3), context=ctx) as publisher:
        for i in range(6):
            publisher.publish([_stored(i)])
        _wait_published(publisher, 6)
        answers = _replay(ctx, publisher, 0)
    assert [int.from_bytes(frames[2], "big") for frames in answers[:-1]] == [3, 4, 5]


def test_a_malformed_replay_request_gets_only_the_end_marker(ctx):
    with KVEventPublisher(_config(), context=ctx) as publisher:
        publisher.publish([_stored(1)])
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(publisher.replay_endpoint)
        dealer.send_multipart([b"", b"\x00\x01"])  # not 8 bytes
        assert dealer.poll(5000)
        assert dealer.recv_multipart() == [b"", b"", END_MARKER_SEQ, b""]
        dealer.close(linger=0)


def test_a_full_queue_drops_the_oldest_batches_without_blocking(ctx, monkeypatch):
    sending = threading.Event()
    release = threading.Event()
    real_send = KVEventPublisher._send

    def stalled_send(self, batch):
        sending.set()
        release.wait(10)
        real_send(self, batch)

    monkeypatch.setattr(KVEventPublisher, "_send", stalled_send)
    with KVEventPublisher(_config(max_queue_size=4), context=ctx) as publisher:
        publisher.publish([_stored(1000)])
        assert sending.wait(5)  # the thread holds batch 1000 and sends nothing more for now
        start = time.monotonic()
        for i in range(10):
            publisher.publish([_stored(i)])
        assert time.monotonic() - start < 1.0
        assert publisher.num_dropped == 6
        release.set()
        _wait_published(publisher, 5)
        answers = _replay(ctx, publisher, 0)
    sent = [msgpack.unpackb(frames[3])[1][0]["block_hashes"][0] for frames in answers[:-1]]
    assert sent == [1000, 6, 7, 8, 9]


def test_close_sends_everything_queued_before_stopping(ctx):
    publisher = KVEventPublisher(_config(), context=ctx)
    sub, last_seq = _subscribe(ctx, publisher)
    for i in range(50):
        publisher.publish([_stored(i)])
    publisher.close()
    assert not publisher._thread.is_alive()
    received = []
    while sub.poll(2000):
        received.append(int.from_bytes(sub.recv_multipart()[1], "big"))
        if len(received) == 50:
            break
    sub.close(linger=0)
    assert received == list(range(last_seq + 1, last_seq + 51))
    publisher.publish([_stored(1)])  # after close: ignored, no error


def test_an_endpoint_without_a_wildcard_is_connected_to(ctx):
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    with KVEventPublisher(
        _config(endpoint=f"tcp://127.0.0.1:{port}", replay_endpoint=None), context=ctx
    ) as pub:
        assert pub.endpoint == f"tcp://127.0.0.1:{port}" and pub.replay_endpoint is None
        deadline = time.monotonic() + 10
        while not sub.poll(50):
            assert time.monotonic() < deadline, "the connecting publisher never delivered"
            pub.publish([_stored(1)])
        topic, seq, payload = sub.recv_multipart()
    sub.close(linger=0)
    assert msgpack.unpackb(payload)[1][0]["block_hashes"] == [1, 2]


def test_sockets_are_bound_on_the_address_given_not_on_every_interface(ctx):
    with KVEventPublisher(_config(), context=ctx) as publisher:
        assert publisher.endpoint.startswith("tcp://127.0.0.1:")
        assert publisher.replay_endpoint.startswith("tcp://127.0.0.1:")
        assert not publisher.endpoint.endswith(":*")


def test_a_busy_port_is_a_clear_error(ctx):
    with KVEventPublisher(_config(), context=ctx) as first:
        with pytest.raises(ValueError, match="pick a free port"):
            KVEventPublisher(_config(replay_endpoint=first.replay_endpoint), context=ctx)


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("tcp://*:5557", True),
        ("tcp://[::]:5557", True),
        ("ipc:///tmp/kv-events", True),
        ("inproc://kv", True),
        ("tcp://127.0.0.1:*", True),
        ("tcp://10.0.0.5:5557", False),
        ("tcp://router.local:5557", False),
    ],
)
def test_wildcards_and_local_sockets_are_bound_other_addresses_connected(endpoint, expected):
    assert binds(endpoint) is expected


def test_data_parallel_ranks_offset_the_port():
    assert endpoint_for_rank("tcp://*:5557", 2) == "tcp://*:5559"
    assert endpoint_for_rank("tcp://10.0.0.5:5557", 1) == "tcp://10.0.0.5:5558"
    assert endpoint_for_rank("ipc:///tmp/kv", 3) == "ipc:///tmp/kv_dp3"
    assert endpoint_for_rank("tcp://127.0.0.1:*", 3) == "tcp://127.0.0.1:*"
    assert endpoint_for_rank("tcp://*:5557", 0) == "tcp://*:5557"
    assert endpoint_for_rank("tcp://*:5557", None) == "tcp://*:5557"
    assert endpoint_for_rank(None, 2) is None
    with pytest.raises(ValueError, match="no port"):
        endpoint_for_rank("tcp://host", 1)


def test_a_data_parallel_rank_gets_its_own_endpoint_and_is_written_in_each_batch(ctx):
    config = _config(endpoint="inproc://kv-events-test", replay_endpoint="inproc://kv-replay-test")
    with KVEventPublisher(config, data_parallel_rank=1, context=ctx) as publisher:
        assert publisher.endpoint == "inproc://kv-events-test_dp1"
        assert publisher.replay_endpoint == "inproc://kv-replay-test_dp1"
        publisher.publish([_stored(1)])
        _wait_published(publisher, 1)
        answers = _replay(ctx, publisher, 0)
    ts, events, rank = msgpack.unpackb(answers[0][3])
    assert rank == 1


def test_the_null_publisher_is_chosen_when_events_are_off():
    assert isinstance(make_kv_event_publisher(KVEventsConfig()), NullPublisher)
    assert isinstance(make_kv_event_publisher(None), NullPublisher)
    off = KVEventsConfig(enable_kv_cache_events=True, publisher="null")
    with make_kv_event_publisher(off) as publisher:
        assert isinstance(publisher, NullPublisher)
        publisher.publish([_stored(1)])
        assert publisher.num_published == 0


def test_the_zmq_publisher_is_chosen_when_events_are_on(ctx):
    publisher = make_kv_event_publisher(_config(), context=ctx)
    try:
        assert isinstance(publisher, KVEventPublisher)
    finally:
        publisher.close()


def test_a_batch_that_cannot_be_encoded_is_dropped_and_publishing_goes_on(ctx):
    with KVEventPublisher(_config(), context=ctx) as publisher:
        publisher.publish([_stored(2**70)])  # beyond msgpack's integers
        publisher.publish([_stored(5)])
        _wait_published(publisher, 1)
        answers = _replay(ctx, publisher, 0)
        assert publisher.num_dropped == 1
    assert [int.from_bytes(frames[2], "big") for frames in answers[:-1]] == [0]
    assert msgpack.unpackb(answers[0][3])[1][0]["block_hashes"] == [5, 6]
