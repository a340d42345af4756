"""The router's KV-event subscriber: both event encodings indexed, gaps filled by replay
in seq order, restarts re-indexed, bad input counted and survived."""

from __future__ import annotations

import os
import time

import msgpack
import pytest
import zmq

from common.config.kv_events_config import KVEventsConfig
from common.kv_event_publisher import KVEventPublisher
from common.kv_events import BlockRemoved, BlockStored
from router.kv_event_subscriber import KVEventSubscriber
from router.prefix_index import PrefixIndex, request_block_hashes
from tests.common import vllm_kv_events as vllm

END_MARKER_SEQ = b"\xff" * 8


def _wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _publish_until(publisher: KVEventPublisher, predicate, what: str) -> None:
    """Keep publishing harmless batches until `predicate` holds: the SUB socket connects in
    the background, so the batches before it did reach the router only through replay,
    and only once a later batch shows the gap."""
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        publisher.publish([BlockRemoved(block_hashes=[999_999])])
        time.sleep(0.02)


def _map_payload(*events) -> bytes:
    return msgpack.packb([time.time(), list(events)])


def _stored_map(hashes, parent=None) -> dict:
    return {
        "type": "BlockStored",
        "block_hashes": list(hashes),
        "parent_block_hash": parent,
        "token_ids": [1] * len(hashes),
        "block_size": 1,
        "lora_id": None,
        "medium": "GPU",
    }


def _removed_map(hashes) -> dict:
    return {"type": "BlockRemoved", "block_hashes": list(hashes), "medium": "GPU"}


class FakeWorker:
    """A hand-driven publisher: an XPUB socket (so the test knows when the router has
    subscribed) and a ROUTER replay socket that the test answers itself."""

    def __init__(self, ctx: zmq.Context, topic: bytes = b"") -> None:
        self.topic = topic
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.bind("tcp://127.0.0.1:*")
        self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay = ctx.socket(zmq.ROUTER)
        self.replay.bind("tcp://127.0.0.1:*")
        self.replay_endpoint = self.replay.getsockopt_string(zmq.LAST_ENDPOINT)

    def wait_subscribed(self) -> None:
        assert self.pub.poll(10_000), "the subscriber never subscribed"
        assert self.pub.recv()[0] == 1

    def send(self, seq: int, payload: bytes) -> None:
        self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])

    def next_replay_request(self, timeout_ms: int = 10_000) -> tuple[bytes, int]:
        assert self.replay.poll(timeout_ms), "no replay request came"
        identity, delimiter, start = self.replay.recv_multipart()
        assert delimiter == b"" and len(start) == 8
        return identity, int.from_bytes(start, "big")

    def answer_replay(self, identity: bytes, batches: dict[int, bytes], old_form: bool = False) -> None:
        for seq, payload in sorted(batches.items()):
            if old_form:  # older vLLM: no topic frame
                self.replay.send_multipart([identity, b"", seq.to_bytes(8, "big"), payload])
            else:
                self.replay.send_multipart([identity, b"", self.topic, seq.to_bytes(8, "big"), payload])
        if old_form:
            self.replay.send_multipart([identity, b"", END_MARKER_SEQ, b""])
        else:
            self.replay.send_multipart([identity, b"", b"", END_MARKER_SEQ, b""])

    def close(self) -> None:
        self.pub.close(linger=0)
        self.replay.close(linger=0)


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.term()


@pytest.fixture
def index():
    return PrefixIndex()


@pytest.fixture
def subscriber(ctx, index):
    sub = KVEventSubscriber(index, context=ctx, replay_timeout_s=5.0)
    sub.start()
    yield sub
    sub.close()


@pytest.fixture
def worker(ctx):
    fake = FakeWorker(ctx)
    yield fake
    fake.close()


def _publisher(ctx, **overrides) -> KVEventPublisher:
    config = KVEventsConfig(
        enable_kv_cache_events=True,
        endpoint="tcp://127.0.0.1:*",
        replay_endpoint="tcp://127.0.0.1:*",
        **overrides,
    )
    return KVEventPublisher(config, context=ctx)


def _stored(hashes, parent=None) -> BlockStored:
    return BlockStored(
        block_hashes=list(hashes), parent_block_hash=parent, token_ids=[1] * len(hashes), block_size=1
    )


def test_events_from_a_real_publisher_are_indexed(ctx, index, subscriber):
    with _publisher(ctx, topic="w0") as publisher:
        subscriber.add_worker("w0", publisher.endpoint, publisher.replay_endpoint, topic="w0")
        publisher.publish([_stored([1, 2, 3])])
        publisher.publish([_stored([4], parent=3), BlockRemoved(block_hashes=[9])])
        _publish_until(publisher, lambda: index.match([1, 2, 3, 4]) == {"w0": 4}, "the stores")
        publisher.publish([BlockRemoved(block_hashes=[2])])
        _publish_until(publisher, lambda: index.match([1, 2, 3, 4]) == {"w0": 1}, "the removal")
    counters = subscriber.counters()
    assert counters.malformed == 0 and counters.lost_batches == 0


def test_a_router_that_starts_after_the_worker_catches_up_through_replay(ctx, index, subscriber):
    with _publisher(ctx) as publisher:
        for i in range(20):
            publisher.publish([_stored([i])])
        _wait_until(lambda: publisher.num_published == 20, what="the publisher to send")
        subscriber.add_worker("w0", publisher.endpoint, publisher.replay_endpoint)
        publisher.publish([_stored([20])])
        _publish_until(publisher, lambda: index.num_blocks("w0") == 21, "the replayed batches")
    counters = subscriber.counters("w0")
    assert counters.gaps_detected >= 1 and counters.replay_requests >= 1
    assert counters.replayed_batches >= 20 and counters.lost_batches == 0


def test_the_older_array_form_of_events_is_indexed_live_and_in_replays(index, subscriber, worker):
    subscriber.add_worker("w0", worker.endpoint, worker.replay_endpoint)
    worker.wait_subscribed()
    # older vLLM: each event an array, the tag first, then the fields in declaration order
    worker.send(0, msgpack.packb([1.0, [["BlockStored", [1, 2], None, [5, 6, 7, 8], 2, None]]]))
    _wait_until(lambda: index.match([1, 2]) == {"w0": 2}, what="the array-form store")

    worker.send(2, msgpack.packb([2.0, [["BlockRemoved", [1]]]]))
    identity, start = worker.next_replay_request()
    assert start == 1
    old = msgpack.packb([1.5, [["BlockStored", [3], 2, [9, 9], 2, None, "GPU"]]])
    worker.answer_replay(identity, {1: old}, old_form=True)
    _wait_until(lambda: not index.holds("w0", 1), what="the batch after the gap")
    assert index.holds("w0", 2) and index.holds("w0", 3)
    assert subscriber.counters("w0").malformed == 0


def test_a_vllm_033_worker_sending_digest_bytes_is_indexed_under_the_routers_own_hashes(
    index, subscriber, worker
):
    """vLLM with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0 publishes whole sha256_cbor digests,
    with its optional fields set; a salted prompt hashed by the router still matches."""
    prompt = list(range(500, 548))  # 3 blocks of 16
    seed = os.environ.get("PYTHONHASHSEED") or "vllm-none-hash"
    digests = vllm.reference_chain(prompt, 16, seed, cache_salt="tenant-a")

    def stored(first: int, last: int) -> vllm.BlockStored:
        return vllm.BlockStored(
            block_hashes=digests[first:last],
            parent_block_hash=digests[first - 1] if first else None,
            token_ids=prompt[16 * first : 16 * last],
            block_size=16,
            lora_id=None,
            medium="GPU",
            lora_name=None,
            extra_keys=[["tenant-a"] if i == 0 else None for i in range(first, last)],
            group_idx=0,
            kv_cache_spec_kind="full_attention",
            locality="LOCAL",
            session_id="s-1",
            lookahead_token_ids=[[1, 2]],
        )

    subscriber.add_worker("vllm-0", worker.endpoint, worker.replay_endpoint)
    worker.wait_subscribed()
    worker.send(0, vllm.encode(vllm.KVEventBatch(ts=1.0, events=[stored(0, 2)], data_parallel_rank=0)))
    wanted = request_block_hashes(prompt, 16, "sha256_cbor", cache_salt="tenant-a")
    _wait_until(lambda: index.match(wanted) == {"vllm-0": 2}, what="the bytes-hash store")
    # the third block only through a replay in vLLM 0.33's frames
    worker.send(2, vllm.encode(vllm.KVEventBatch(ts=3.0, events=[])))
    identity, start = worker.next_replay_request()
    assert start == 1
    worker.answer_replay(identity, {1: vllm.encode(vllm.KVEventBatch(ts=2.0, events=[stored(2, 3)]))})
    _wait_until(lambda: index.match(wanted) == {"vllm-0": 3}, what="the replayed bytes-hash store")
    assert index.match(request_block_hashes(prompt, 16, "sha256_cbor")) == {}  # unsalted: not these
    assert subscriber.counters("vllm-0").malformed == 0


def test_a_gap_is_filled_by_replay_and_applied_in_seq_order(index, subscriber, worker):
    subscriber.add_worker("w0", worker.endpoint, worker.replay_endpoint)
    worker.wait_subscribed()
    batches = {
        0: _map_payload(_stored_map([1])),
        1: _map_payload(_stored_map([2], parent=1)),  # lost on the live stream
        2: _map_payload(_removed_map([2])),  # must come after seq 1, or block 2 would stay
        3: _map_payload(_stored_map([3], parent=1)),
    }
    worker.send(0, batches[0])
    worker.send(2, batches[2])
    worker.send(3, batches[3])
    identity, start = worker.next_replay_request()
    assert start == 1
    time.sleep(0.1)
    assert not index.holds("w0", 3), "batches after a hole must wait for it"
    worker.answer_replay(identity, {seq: batches[seq] for seq in (1, 2, 3)})

    _wait_until(lambda: index.holds("w0", 3), what="the waiting batches")
    _wait_until(lambda: subscriber.counters("w0").replayed_batches == 3, what="the whole replay")
    assert not index.holds("w0", 2)
    counters = subscriber.counters("w0")
    assert counters.gaps_detected == 1 and counters.replay_requests == 1
    assert counters.replayed_batches == 3 and counters.duplicates == 2 and counters.lost_batches == 0


def test_batches_the_replay_cannot_supply_are_skipped_and_counted(index, subscriber, worker):
    subscriber.add_worker("w0", worker.endpoint, worker.replay_endpoint)
    worker.wait_subscribed()
    worker.send(0, _map_payload(_stored_map([1])))
    worker.send(3, _map_payload(_stored_map([4])))
    identity, start = worker.next_replay_request()
    assert start == 1
    worker.answer_replay(identity, {2: _map_payload(_stored_map([3]))})  # seq 1 is too old now
    _wait_until(lambda: index.holds("w0", 4), what="the batches after the hole")
    assert index.holds("w0", 3)
    assert subscriber.counters("w0").lost_batches == 1


def test_a_replay_that_never_answers_times_out_and_the_stream_goes_on(ctx, index, worker):
    with KVEventSubscriber(index, context=ctx, replay_timeout_s=0.3) as subscriber:
        subscriber.add_worker("w0", worker.endpoint, worker.replay_endpoint)
        worker.wait_subscribed()
        worker.send(0, _map_payload(_stored_map([1])))
        worker.send(2, _map_payload(_stored_map([3])))
        worker.next_replay_request()  # and never answered
        _wait_until(lambda: index.holds("w0", 3), what="the stream to go on after the timeout")
        worker.send(3, _map_payload(_stored_map([4])))
        _wait_until(lambda: index.holds("w0", 4), what="the next batch")
        counters = subscriber.counters("w0")
    assert counters.replay_timeouts == 1 and counters.lost_batches == 1


def test_without_a_replay_endpoint_a_gap_is_counted_and_skipped(index, subscriber, worker):
    subscriber.add_worker("w0", worker.endpoint)
    worker.wait_subscribed()
    worker.send(0, _map_payload(_stored_map([1])))
    worker.send(5, _map_payload(_stored_map([2])))
    _wait_until(lambda: index.holds("w0", 2), what="the batch after the gap")
    counters = subscriber.counters("w0")
    assert counters.gaps_detected == 1 and counters.lost_batches == 4 and counters.replay_requests == 0


def test_a_publisher_restart_drops_the_workers_entries_and_reindexes(index, subscriber, worker):
    subscriber.add_worker("w0", worker.endpoint, worker.replay_endpoint)
    worker.wait_subscribed()
    for seq, h in enumerate((1, 2, 3)):
        worker.send(seq, _map_payload(_stored_map([h])))
    _wait_until(lambda: index.num_blocks("w0") == 3, what="the first life's blocks")

    worker.send(0, _map_payload(_stored_map([7])))  # seq back to 0: a new publisher
    _wait_until(lambda: index.holds("w0", 7), what="the new life's blocks")
    assert index.num_blocks("w0") == 1
    worker.send(1, _map_payload(_stored_map([8], parent=7)))
    _wait_until(lambda: index.match([7, 8]) == {"w0": 2}, what="the next batch of the new life")
    counters = subscriber.counters("w0")
    assert counters.restarts == 1 and counters.gaps_detected == 0


def test_malformed_messages_are_counted_and_skipped_without_a_gap(index, subscriber, worker):
    subscriber.add_worker("w0", worker.endpoint, worker.replay_endpoint)
    worker.wait_subscribed()
    worker.send(0, b"\xc1 not msgpack")
    worker.send(1, msgpack.packb([1.0, [{"type": "BlockExploded"}]]))
    worker.pub.send_multipart([b"", b"short-seq", b""])
    worker.pub.send(b"one frame")
    worker.send(2, _map_payload(_stored_map([1])))
    _wait_until(lambda: index.holds("w0", 1), what="the good batch")
    counters = subscriber.counters("w0")
    assert counters.malformed == 4 and counters.gaps_detected == 0 and counters.events_indexed == 1


def test_each_worker_is_indexed_under_its_own_id(ctx, index, subscriber):
    workers = [FakeWorker(ctx) for _ in range(2)]
    try:
        for i, fake in enumerate(workers):
            subscriber.add_worker(f"w{i}", fake.endpoint, fake.replay_endpoint)
            fake.wait_subscribed()
        workers[0].send(0, _map_payload(_stored_map([1, 2])))
        workers[1].send(0, _map_payload(_stored_map([1])))
        _wait_until(lambda: index.match([1, 2]) == {"w0": 2, "w1": 1}, what="both workers' blocks")
    finally:
        for fake in workers:
            fake.close()


def test_a_worker_removed_is_no_longer_read_and_its_entries_are_gone(index, subscriber, worker):
    subscriber.add_worker("w0", worker.endpoint, worker.replay_endpoint)
    worker.wait_subscribed()
    worker.send(0, _map_payload(_stored_map([1])))
    _wait_until(lambda: index.holds("w0", 1), what="the first batch")
    subscriber.remove_worker("w0")
    assert index.match([1]) == {}
    worker.send(1, _map_payload(_stored_map([2])))
    time.sleep(0.1)
    assert index.num_blocks() == 0
    assert subscriber.counters().events_indexed == 1  # the removed worker's counters still count


def test_a_bind_address_is_refused_with_a_hint(subscriber):
    with pytest.raises(ValueError, match="bind address"):
        subscriber.add_worker("w0", "tcp://*:5557")
