"""When load reports go out: after a hello, on changes (at most every 50 ms), and as a
heartbeat every second."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from common.protocol import LoadReport, ProtocolError, WorkerRole, decode_message, encode_message
from common.worker.load_reports import HEARTBEAT_S, MAX_ROUTERS, MIN_INTERVAL_S, LoadReporter
from router.worker_state import WorkerState
from tests.harness.manual_clock import ManualClock as Clock


@dataclass
class Stats:
    num_running: int = 0
    num_waiting: int = 0
    num_waiting_for_remote_kv: int = 0
    kv_cache_usage: float = 0.0
    num_queued_prefill_tokens: int = 0


def reporter(clock: Clock) -> LoadReporter:
    return LoadReporter(worker_id="w", role="decode", engine_id="e", info={"block_size": 16}, clock=clock)


def test_nothing_is_due_before_a_router_says_hello():
    clock = Clock(100.0)
    r = reporter(clock)
    assert r.due(Stats()) is None
    clock.now += 10
    assert r.due(Stats()) is None


def test_a_change_is_reported_at_most_every_50_ms_and_silence_every_second():
    clock = Clock(100.0)
    r = reporter(clock)
    r.add_router(b"id", "router-1")
    first = r.due(Stats(num_running=1))
    assert first is not None and first.num_running == 1 and first.block_size == 16
    clock.now += MIN_INTERVAL_S / 2
    assert r.due(Stats(num_running=2)) is None  # too soon after the last
    assert 0 < r.seconds_until_due(Stats(num_running=2)) <= MIN_INTERVAL_S / 2
    clock.now += MIN_INTERVAL_S / 2
    assert r.due(Stats(num_running=2)).num_running == 2
    clock.now += HEARTBEAT_S / 2
    assert r.due(Stats(num_running=2)) is None  # unchanged: wait for the heartbeat
    clock.now += HEARTBEAT_S / 2
    assert r.due(Stats(num_running=2)) is not None


def test_waiting_counts_requests_waiting_for_their_kv_pull():
    report = reporter(Clock(100.0)).report(
        Stats(
            num_running=3,
            num_waiting=2,
            num_waiting_for_remote_kv=4,
            kv_cache_usage=0.5,
            num_queued_prefill_tokens=7,
        )
    )
    assert (
        report.num_running,
        report.num_waiting,
        report.kv_cache_usage,
        report.num_queued_prefill_tokens,
    ) == (
        3,
        6,
        0.5,
        7,
    )
    assert (report.worker_id, report.role, report.engine_id) == ("w", "decode", "e")


def test_only_the_most_recent_routers_are_kept():
    r = reporter(Clock(100.0))
    for i in range(MAX_ROUTERS + 5):
        r.add_router(f"id-{i}".encode(), f"router-{i}")
    assert len(r.routers) == MAX_ROUTERS and b"id-0" not in r.routers and b"id-5" in r.routers


# the worker's info, as run_worker's ready_info gives it: what the report takes, and more
READY_INFO = {
    "worker_id": "w", "role": "decode", "address": "tcp://10.0.0.5:7000", "engine_id": "e", "model": "tiny",
    "block_size": 16, "num_kv_blocks": 95, "max_num_seqs": 64, "prefix_caching_hash_algo": "sha256",
    "kv_events_endpoint": "tcp://10.0.0.5:5557", "kv_replay_endpoint": None, "kv_events_topic": "kv",
    "kv_role": "kv_consumer", "pid": 1234,
}  # fmt: skip


def test_the_workers_report_reaches_the_router_as_it_was_built():
    reporter = LoadReporter(worker_id="w", role="decode", engine_id="e", info=READY_INFO, clock=Clock(100.0))
    built = reporter.report(
        Stats(num_running=2, num_waiting=1, kv_cache_usage=0.25, num_queued_prefill_tokens=9)
    )
    assert (built.block_size, built.num_kv_blocks, built.max_num_seqs) == (16, 95, 64)
    assert (built.kv_events_endpoint, built.kv_events_topic) == ("tcp://10.0.0.5:5557", "kv")
    received = decode_message(encode_message(built))
    assert received == built and isinstance(received, LoadReport) and received.role is WorkerRole.DECODE
    state = WorkerState("w", WorkerRole.DECODE, "tcp://10.0.0.5:7000")
    state.update_load(received)
    assert state.load == built
    assert (state.num_active_requests, state.queued_prefill_tokens, state.active_kv_blocks) == (3, 9, 24)


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_running", "3"), ("num_waiting", 1.5), ("num_kv_blocks", True), ("kv_cache_usage", "half"),
     ("kv_cache_usage", 1.5), ("role", "both"), ("role", ["decode"]), ("block_size", -16),
     ("kv_events_endpoint", 5557), ("prefix_caching_hash_algo", None)],
)  # fmt: skip
def test_a_report_with_a_wrong_typed_field_is_refused(field, value):
    reporter = LoadReporter(worker_id="w", role="decode", engine_id="e", info=READY_INFO, clock=Clock(100.0))
    body = reporter.report(Stats()).to_dict()
    body[field] = value
    with pytest.raises(ProtocolError, match=field):
        decode_message(encode_message(LoadReport(**body)))
