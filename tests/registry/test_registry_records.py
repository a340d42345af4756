"""The registry's record format and URL: what a router accepts from Redis and what it refuses."""

from __future__ import annotations

import json

import pytest

from common.registry import WorkerRecord, check_registry_url, redacted


def record(**changes) -> WorkerRecord:
    fields = {
        "worker_id": "decode-a",
        "role": "decode",
        "address": "tcp://10.0.0.5:8200",
        "model": "SmolLM2-135M-Instruct",
        "engine_id": "engine-1",
        "ttl_s": 10.0,
        "kv_events_endpoint": "tcp://10.0.0.5:5557",
        "tensor_parallel_size": 2,
        "load": {"num_running": 3, "kv_cache_usage": 0.25},
        **changes,
    }
    return WorkerRecord(**fields)


def test_a_record_survives_the_round_trip_through_json():
    original = record(started_at=1700000000.125, heartbeat_at=1700000003.5, metrics_port=9000)
    assert WorkerRecord.from_json(original.to_json()) == original
    assert WorkerRecord.from_json(original.to_json().encode()) == original


def test_fields_a_newer_worker_adds_are_ignored():
    data = json.loads(record().to_json()) | {"gpu_kind": "H100"}
    assert WorkerRecord.from_json(json.dumps(data)) == record()


def valid_data() -> dict:
    return json.loads(record().to_json())


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("not json", "must be JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({k: v for k, v in valid_data().items() if k != "model"}), r"lacks \['model'\]"),
    ],
)
def test_a_record_that_is_not_one_is_refused(text, complaint):
    with pytest.raises(ValueError, match=complaint):
        WorkerRecord.from_json(text)


@pytest.mark.parametrize(
    "changes, complaint",
    [
        ({"role": "router"}, "role must be one of"),
        ({"address": "10.0.0.5:8200"}, "ZMQ address"),
        ({"address": "tcp://*:8200"}, "ZMQ address"),
        ({"ttl_s": 0}, "ttl_s"),
        ({"ttl_s": "10"}, "ttl_s"),
        ({"worker_id": ""}, "worker_id must not be empty"),
        ({"worker_id": 7}, "worker_id must be a string"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
        ({"kv_events_endpoint": 5557}, "kv_events_endpoint"),
        ({"load": {"num_running": "many"}}, "load must map"),
    ],
)
def test_a_malformed_record_is_refused_with_the_field_named(changes, complaint):
    with pytest.raises(ValueError, match=complaint):
        WorkerRecord.from_json(json.dumps(valid_data() | changes))


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "redis://redis:6379", "rediss://user:pw@cache.example:6380/3"]
)
def test_redis_urls_are_accepted(url):
    assert check_registry_url(url) == url


@pytest.mark.parametrize(
    "url, complaint",
    [
        ("127.0.0.1:6379", "not a Redis URL"),
        ("http://127.0.0.1:6379", "not a Redis URL"),
        ("redis://:6379/0", "no host"),
        ("redis://127.0.0.1:port/0", "bad port"),
        ("redis://127.0.0.1:6379/main", "must be a number"),
    ],
)
def test_a_bad_registry_url_says_how_to_write_one(url, complaint):
    with pytest.raises(ValueError, match=complaint):
        check_registry_url(url)


def test_passwords_stay_out_of_logged_urls():
    assert redacted("redis://user:s3cret@10.0.0.2:6379/0") == "redis://user:***@10.0.0.2:6379/0"
    assert redacted("redis://10.0.0.2:6379/0") == "redis://10.0.0.2:6379/0"
