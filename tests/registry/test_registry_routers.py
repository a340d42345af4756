"""Routers that find their workers in a real Redis registry, with real processes on
loopback: `pdserve serve --registry` (its prefill and decode workers register, its own
router watches too) and two more `pdserve router --registry` processes that know only
the registry. They serve the same workers side by side; stopping one leaves the other
serving; a restarted Redis loses every record and the routers keep serving and pick up
new workers after it; a worker killed outright leaves the routers once its TTL is up."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pytest

from common.registry import KEY_PREFIX, WorkerRecord
from tests.harness.stack import RouterProcess, ServeStack, WorkerProcess
from tests.registry.redis_server import RedisServer, wait_until

TTL_S = 3
MAX_MODEL_LEN = 256
ENGINE_FLAGS = [
    "--dtype", "float32", "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN),
    "--num-gpu-blocks-override", "64", "--block-size", "16",
]  # fmt: skip
MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"
# generous: two CPU cores are shared by every test process
SLACK_S = 20


@pytest.fixture(scope="module")
def redis_registry():
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stack(redis_registry):
    serve = ServeStack(
        [*ENGINE_FLAGS, "--registry", redis_registry.url, "--registry-ttl", str(TTL_S),
         "--num-prefill-workers", "1", "--local-prefill-threshold", "0", "--worker-health-timeout", "30", "--disable-uvicorn-access-log"]
    )  # fmt: skip
    try:
        yield serve.ready()
    finally:
        serve.stop()


def registry_router(url: str) -> RouterProcess:
    return RouterProcess(
        ["--registry", url, "--max-model-len", str(MAX_MODEL_LEN), "--local-prefill-threshold", "0",
         "--worker-health-timeout", "30"]
    ).ready()  # fmt: skip


@pytest.fixture(scope="module")
def routers(stack, redis_registry):
    started = []
    try:
        for _ in range(2):
            started.append(registry_router(redis_registry.url))
        yield started
    finally:
        for router in started:
            router.stop()


def health(url: str) -> dict:
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:  # 503 has the same body
        return json.loads(error.read())


def workers(url: str, healthy_only: bool = True) -> dict[str, str]:
    """address -> role of the workers the router at `url` holds."""
    return {w["worker"]: w["role"] for w in health(url)["workers"] if w["healthy"] or not healthy_only}


def complete(url: str) -> str:
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0}).encode()
    request = urllib.request.Request(
        url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        return json.loads(response.read())["choices"][0]["text"]


def registered(server: RedisServer) -> dict[str, WorkerRecord]:
    client = server.client()
    try:
        keys = list(client.scan_iter(match=KEY_PREFIX + "*"))
        records = [WorkerRecord.from_json(v) for v in client.mget(keys) if v is not None] if keys else []
    finally:
        client.close()
    return {r.address: r for r in records}


def test_serves_workers_register_with_what_routers_need(stack, redis_registry):
    # a worker registers before its first heartbeat carries a load report: wait for that one
    records = wait_until(
        lambda: (r := registered(redis_registry)) and all(x.load for x in r.values()) and r,
        30,
        "every registered worker's first load report",
    )
    expected = {address: role for role in ("prefill", "decode") for address in stack.addresses(role)}
    assert {a: r.role for a, r in records.items()} == expected
    for record in records.values():
        assert record.model == MODEL and record.engine_id and record.tensor_parallel_size == 1
        assert record.kv_events_endpoint and record.kv_events_endpoint.startswith("tcp://127.0.0.1:")
        assert record.ttl_s == TTL_S and set(record.load) >= {"num_running", "kv_cache_usage"}


def test_two_routers_on_one_registry_serve_the_same_workers(stack, routers):
    expected = {address: role for role in ("prefill", "decode") for address in stack.addresses(role)}
    answers = []
    for router in routers:
        assert wait_until(
            lambda r=router: workers(r.url) == expected, SLACK_S, f"{router.url} seeing every worker"
        )
        answers.append(complete(router.url))
    assert answers[0] and answers[0] == answers[1] == complete(stack.url)


def test_stopping_one_router_leaves_the_other_serving(stack, routers):
    first, second = routers
    assert first.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    assert "Application shutdown complete" in first.output() and "Traceback" not in first.output()
    assert complete(second.url)
    assert workers(second.url) == {a: r for r, addrs in stack.workers.items() for a, _ in addrs}


def test_routers_keep_serving_through_a_redis_restart_and_find_new_workers_after(
    stack, routers, redis_registry, tmp_path
):
    router = routers[1]
    known = workers(router.url)
    redis_registry.stop()
    time.sleep(TTL_S + 1)  # longer than the TTL: the records would have expired
    assert workers(router.url) == known and complete(router.url)

    redis_registry.start()  # empty
    wait_until(
        lambda: set(registered(redis_registry)) == set(known), SLACK_S, "the workers registering again"
    )
    time.sleep(TTL_S + 1)  # past the routers' grace period
    assert workers(router.url) == known and complete(router.url)

    # the watch is back: a new decode worker joins, and leaves TTL seconds after a kill -9
    extra = WorkerProcess(
        "decode", [*ENGINE_FLAGS, "--registry", redis_registry.url, "--registry-ttl", str(TTL_S)], tmp_path
    )
    try:
        extra.ready()
        wait_until(lambda: extra.address in workers(router.url), SLACK_S, "the router adding the new worker")
        wait_until(lambda: extra.address in workers(stack.url), SLACK_S, "serve's router adding it too")
        extra.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(
            lambda: extra.address not in workers(router.url, healthy_only=False),
            TTL_S + SLACK_S,
            "the router removing the killed worker",
        )
        assert time.monotonic() - killed_at >= TTL_S - 1  # it went with its record, not before
        assert extra.address not in registered(redis_registry)
        assert complete(router.url)
    finally:
        extra.stop()
