"""Faults around the decode side, with real processes on loopback: two `pdserve decode`
workers (KV events on, each prefilling its own prompts) behind `pdserve router`.

- the router is killed (kill -9) with a stream in flight: that client gets an error, a
  stream through another router in front of the same workers finishes untouched, the
  workers keep running and finish the orphaned request, and a new router on the
  same port finds the workers again and rebuilds their prefix-index entries from the
  workers' KV-event replay;
- a decode worker is killed mid-stream: its streaming client gets an error event and
  `data: [DONE]` in bounded time, the router marks it down and sends new requests to the
  other worker, and when it comes back at the same address it is admitted again and its
  prefix-index entries are rebuilt from its KV events.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.harness.faults import (
    ENGINE_FLAGS,
    complete,
    events_config,
    index_blocks,
    routed,
    stream_in_background,
)
from tests.harness.stack import (
    RouterProcess,
    WorkerProcess,
    free_address,
    free_port,
    metric,
    router_healthy,
    stop_all,
    wait_until,
)

STREAM = {"max_tokens": 300, "ignore_eos": True, "temperature": 0}
FAIL_BOUND_S = 30.0  # a client of a failed request hears about it within this
TOPICS = ["rivers", "glaciers", "volcanoes", "deserts", "forests", "oceans", "caves", "islands"]


def _prompt(topic: str) -> str:
    return f"Write a long and careful report about {topic}, with examples and a summary. " * 3


@pytest.fixture(scope="module")
def decode_workers(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("decode-faults")
    args = [*ENGINE_FLAGS, "--kv-events-config", events_config()]
    # fixed addresses, so a killed worker comes back where the router looks for it
    workers = [WorkerProcess("decode", args, workdir, address=free_address()) for _ in range(2)]
    try:
        for worker in workers:
            worker.ready()
        yield workers
    finally:
        stop_all(workers)


def _router(workers: list[WorkerProcess], port: int | None = None) -> RouterProcess:
    args = ["--decode-workers", ",".join(w.address for w in workers), "--worker-reply-timeout", "60"]
    router = RouterProcess(args, port=port).ready(require_healthy=False)
    for worker in workers:
        wait_until(
            lambda w=worker: router_healthy(router.url, w.address), 60, f"router admits {worker.address}"
        )
    return router


def _worker_running(worker: WorkerProcess) -> float:
    return worker.metric("vllm:num_requests_running")


def test_killed_router_fails_its_streams_and_a_new_router_rediscovers_the_workers(decode_workers):
    port = free_port()
    router = _router(decode_workers, port)
    bystander = _router(decode_workers)  # another router in front of the same workers
    try:
        for topic in TOPICS:  # until the router has indexed blocks of every worker
            assert complete(router.url, _prompt(topic)).status_code == 200
            before = {w.address: index_blocks(router.url, w.address) for w in decode_workers}
            if all(before.values()):
                break
        assert all(before.values()), f"the router indexed no KV events of some worker: {before}"

        result, thread = stream_in_background(router.url, {"prompt": _prompt("comets"), **STREAM}, 120)
        other, other_thread = stream_in_background(
            bystander.url, {"prompt": _prompt("meteors"), **STREAM, "max_tokens": 40}, 120
        )
        assert result.first_chunk.wait(120) and result.chunks, f"no first chunk: {result.failure!r}"
        assert other.first_chunk.wait(120) and other.chunks, f"no first chunk: {other.failure!r}"
        router.kill()
        thread.join(FAIL_BOUND_S)
        assert not thread.is_alive(), "the client of the killed router was left hanging"
        assert result.failure is not None and not result.done, "the stream should end with an error"
        other_thread.join(120)
        assert other.failure is None and other.done and not other.errors, other.events[-3:]
        assert sum(len(c["choices"][0].get("text", "")) > 0 for c in other.chunks) > 0
        assert other.chunks[-1]["choices"][0]["finish_reason"] == "length"
    finally:
        router.stop()
        bystander.stop()

    for worker in decode_workers:  # the workers kept running and let the orphan go
        worker.check_running()
        wait_until(lambda w=worker: _worker_running(w) == 0, 120, f"{worker.address} idle")

    router = _router(decode_workers, port)
    try:
        response = complete(router.url, _prompt(TOPICS[3]))
        assert response.status_code == 200, response.text
        served = [w.address for w in decode_workers if routed(router.url, w.address) > 0]
        assert len(served) == 1
        # that worker's next KV event makes the new router replay what it published before
        wait_until(
            lambda: (
                index_blocks(router.url, served[0]) > before[served[0]]
                and metric(router.url, "pdserve_router_kv_event_replayed_batches_total", worker=served[0]) > 0
            ),
            30,
            "prefix-index entries rebuilt by replay",
        )
    finally:
        router.stop()


def test_killed_decode_worker_fails_its_stream_and_comes_back(decode_workers):
    router = _router(decode_workers)
    try:
        result, thread = stream_in_background(router.url, {"prompt": _prompt(TOPICS[4]), **STREAM}, 120)
        assert result.first_chunk.wait(120) and result.chunks, f"no first chunk: {result.failure!r}"
        [victim] = [w for w in decode_workers if routed(router.url, w.address) > 0]
        [other] = [w for w in decode_workers if w is not victim]
        wait_until(lambda: index_blocks(router.url, victim.address) > 0, 10, "the router indexes its prompt")
        victim.kill()
        killed_at = time.monotonic()

        thread.join(FAIL_BOUND_S)
        assert not thread.is_alive(), "the stream of the killed worker hung"
        assert result.failure is None, f"the stream broke instead of ending cleanly: {result.failure!r}"
        assert result.done, "the stream did not end with data: [DONE]"
        assert len(result.errors) == 1 and result.errors[0]["message"], result.events[-3:]
        assert result.finished_at - killed_at < FAIL_BOUND_S

        wait_until(
            lambda: not router_healthy(router.url, victim.address),
            10,
            "the router marks the killed worker down",
        )
        assert index_blocks(router.url, victim.address) == 0, "a dead worker must not look warm"
        victim_routed = routed(router.url, victim.address)
        other_routed = routed(router.url, other.address)
        for topic in TOPICS[5:8]:
            response = complete(router.url, _prompt(topic))
            assert response.status_code == 200, response.text
        assert routed(router.url, victim.address) == victim_routed
        assert routed(router.url, other.address) == other_routed + 3

        victim.start().ready()  # same address
        wait_until(
            lambda: router_healthy(router.url, victim.address), 60, "the restarted worker is admitted again"
        )
        for attempt in range(6):  # until one lands on it: the other is warm for these prompts
            before = routed(router.url, victim.address)
            with ThreadPoolExecutor(2) as pool:
                responses = list(
                    pool.map(
                        lambda t: complete(router.url, _prompt(t)), [f"moons {attempt}", f"stars {attempt}"]
                    )
                )
            assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
            if routed(router.url, victim.address) > before:
                break
        else:
            raise AssertionError("the restarted worker got no request")
        wait_until(
            lambda: index_blocks(router.url, victim.address) > 0, 30, "its prefix-index entries are rebuilt"
        )
    finally:
        router.stop()
