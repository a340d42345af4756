"""A worker's heartbeat against a real redis-server: its record lives while it beats,
expires when it stops, leaves at once on a clean stop, and comes back after Redis does."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

from common.registry import CHANNEL, WorkerRecord, worker_key
from common.registry_heartbeat import RecordingLoadReporter, RegistryHeartbeat, load_of
from tests.registry.redis_server import wait_until


def make_record(worker_id: str = "decode-1", ttl_s: float = 1.5, port: int = 8200) -> WorkerRecord:
    return WorkerRecord(
        worker_id=worker_id,
        role="decode",
        address=f"tcp://127.0.0.1:{port}",
        model="m",
        engine_id=f"engine-{worker_id}",
        ttl_s=ttl_s,
    )


def stored(client, worker_id: str) -> WorkerRecord | None:
    value = client.get(worker_key(worker_id))
    return None if value is None else WorkerRecord.from_json(value)


def test_the_record_is_written_with_its_ttl_and_the_latest_load(redis_server):
    client = redis_server.client()
    load = {"num_running": 0}
    heartbeat = RegistryHeartbeat(redis_server.url, make_record(ttl_s=3.0), lambda: dict(load))
    heartbeat.start()
    try:
        first = wait_until(lambda: stored(client, "decode-1"), 5, "the first heartbeat")
        assert first.address == "tcp://127.0.0.1:8200" and first.load == {"num_running": 0}
        assert 0 < client.pttl(worker_key("decode-1")) <= 3000
        load["num_running"] = 4
        later = wait_until(
            lambda: (r := stored(client, "decode-1")) and r.load["num_running"] == 4 and r, 5, "a later beat"
        )
        assert later.heartbeat_at > first.heartbeat_at and later.started_at == first.started_at
    finally:
        heartbeat.close()
        client.close()


def test_a_record_expires_when_its_worker_stops_beating(redis_server):
    client = redis_server.client()
    heartbeat = RegistryHeartbeat(redis_server.url, make_record(ttl_s=1.0))
    heartbeat.start()
    wait_until(lambda: stored(client, "decode-1"), 5, "registration")
    heartbeat._stop.set()  # the worker dies: no more beats, no goodbye
    heartbeat._thread.join(5)
    wait_until(lambda: stored(client, "decode-1") is None, 3, "the record's expiry")
    client.close()


def test_a_clean_stop_deletes_the_record_and_announces_it(redis_server):
    client = redis_server.client()
    pubsub = client.pubsub()
    pubsub.subscribe(CHANNEL)
    heartbeat = RegistryHeartbeat(redis_server.url, make_record(ttl_s=30.0))
    heartbeat.start()
    wait_until(lambda: stored(client, "decode-1"), 5, "registration")
    heartbeat.close()
    assert stored(client, "decode-1") is None
    events = []
    deadline = time.monotonic() + 5
    while len(events) < 2 and time.monotonic() < deadline:
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
        if message is not None:
            events.append(json.loads(message["data"]))
    assert events == [{"event": "up", "worker_id": "decode-1"}, {"event": "down", "worker_id": "decode-1"}]
    pubsub.close()
    client.close()


def test_a_stop_leaves_a_newer_instance_of_the_same_worker_alone(redis_server):
    client = redis_server.client()
    old = RegistryHeartbeat(redis_server.url, make_record(ttl_s=30.0))
    old.start()
    wait_until(lambda: stored(client, "decode-1"), 5, "registration")
    old._stop.set()
    old._thread.join(5)
    new = RegistryHeartbeat(redis_server.url, make_record(ttl_s=30.0, port=8300))
    new.start()
    wait_until(
        lambda: (r := stored(client, "decode-1")) and r.address.endswith(":8300"), 5, "re-registration"
    )
    old.close()
    assert stored(client, "decode-1").address.endswith(":8300")
    new.close()
    client.close()


def test_the_worker_registers_again_once_a_restarted_redis_is_back(redis_server):
    heartbeat = RegistryHeartbeat(redis_server.url, make_record(ttl_s=1.5))
    heartbeat.start()
    try:
        client = redis_server.client()
        wait_until(lambda: stored(client, "decode-1"), 5, "registration")
        client.close()
        redis_server.stop()
        beats = heartbeat.num_beats
        time.sleep(1.2)  # beats fail meanwhile; the heartbeat goes on
        assert heartbeat.num_beats == beats and heartbeat._thread.is_alive()
        redis_server.start()  # empty: the record was lost with the old process
        client = redis_server.client()
        wait_until(lambda: stored(client, "decode-1"), 5, "registration after the restart")
        client.close()
    finally:
        heartbeat.close()


def test_the_load_is_the_serving_loops_last_stats():
    reporter = RecordingLoadReporter(worker_id="w", role="decode", engine_id="e")
    assert load_of(reporter.last_stats) == {}
    stats = SimpleNamespace(
        num_running=2, num_waiting=1, num_waiting_for_remote_kv=3, kv_cache_usage=0.123456,
        num_queued_prefill_tokens=40, num_prompt_tokens=500,
    )  # fmt: skip
    assert reporter.due(stats) is None  # no router said hello: nothing to send, but recorded
    assert load_of(reporter.last_stats) == {
        "num_running": 2, "num_waiting": 4, "kv_cache_usage": 0.1235, "num_queued_prefill_tokens": 40,
        "num_prompt_tokens_total": 500,
    }  # fmt: skip
