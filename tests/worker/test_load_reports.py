"""When load reports go out: after a hello, on changes (at most every 50 ms), and as a
heartbeat every second."""

from __future__ import annotations

from dataclasses import dataclass

from common.worker.load_reports import HEARTBEAT_S, MAX_ROUTERS, MIN_INTERVAL_S, LoadReporter


@dataclass
class Stats:
    num_running: int = 0
    num_waiting: int = 0
    num_waiting_for_remote_kv: int = 0
    kv_cache_usage: float = 0.0
    num_queued_prefill_tokens: int = 0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def reporter(clock: Clock) -> LoadReporter:
    return LoadReporter(worker_id="w", role="decode", engine_id="e", extra={"block_size": 16}, clock=clock)


def test_nothing_is_due_before_a_router_says_hello():
    clock = Clock()
    r = reporter(clock)
    assert r.due(Stats()) is None
    clock.now += 10
    assert r.due(Stats()) is None


def test_a_change_is_reported_at_most_every_50_ms_and_silence_every_second():
    clock = Clock()
    r = reporter(clock)
    r.add_router(b"id", "router-1")
    first = r.due(Stats(num_running=1))
    assert first is not None and first.num_running == 1 and first.extra == {"block_size": 16}
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
    report = reporter(Clock()).report(
        Stats(
            num_running=3,
            num_waiting=2,
            num_waiting_for_remote_kv=4,
            kv_cache_usage=0.5,
            num_queued_prefill_tokens=7,
        )
    )
    assert (report.num_running, report.num_waiting, report.kv_cache_usage, report.queued_prefill_tokens) == (
        3,
        6,
        0.5,
        7,
    )
    assert (report.worker_id, report.role, report.engine_id) == ("w", "decode", "e")


def test_only_the_most_recent_routers_are_kept():
    r = reporter(Clock())
    for i in range(MAX_ROUTERS + 5):
        r.add_router(f"id-{i}".encode(), f"router-{i}")
    assert len(r.routers) == MAX_ROUTERS and b"id-0" not in r.routers and b"id-5" in r.routers
