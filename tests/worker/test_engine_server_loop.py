"""How long the worker loop naps between turns: never after a pull lands (its request steps at
once), a short nap while pulls are in flight, a longer one when a step could schedule nothing."""

from __future__ import annotations

import pytest
import zmq

from common.engine.llm_engine import EngineStats
from common.worker import engine_server
from common.worker.engine_server import EngineServer
from common.worker.load_reports import LoadReporter


class PullingEngine:
    """An engine whose one request waits for its prompt's KV, as a decode worker's does:
    the step that admits it schedules nothing; once the pull lands the request runs."""

    def __init__(self) -> None:
        self.pull_landed = False
        self.num_steps = 0
        self.blocked = False  # a schedulable request that finds no free block

    def has_schedulable_requests(self) -> bool:
        return self.pull_landed or self.blocked

    def has_kv_transfers(self) -> bool:
        return not self.pull_landed

    def process_kv_transfers(self) -> None:
        self.pull_landed = True  # the connector's poll reports it done

    def step(self) -> list:
        return []  # schedules nothing: neither outputs nor a step

    def stats(self) -> EngineStats:
        zero = dict.fromkeys(
            ("num_running", "num_waiting", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions",
             "num_prompt_tokens", "num_generation_tokens", "num_steps"),
            0,
        )  # fmt: skip
        return EngineStats(**zero, kv_cache_usage=0.0, num_waiting_for_remote_kv=0 if self.pull_landed else 1)


@pytest.fixture
def server():
    engine = PullingEngine()
    ctx = zmq.Context()
    reporter = LoadReporter(worker_id="w", role="decode", engine_id="e", info={"block_size": 16})
    srv = EngineServer(engine, address="tcp://127.0.0.1:0", reporter=reporter, context=ctx)
    yield srv, engine
    srv.close()
    ctx.term()


def test_a_landed_pull_steps_at_once_but_an_empty_step_naps(server):
    srv, engine = server
    engine.blocked = True
    srv._turn()  # the step that admits the request starts its pull and schedules nothing
    engine.blocked = False
    assert srv._poll_timeout(engine.stats()) == engine_server.PULL_POLL_S
    srv._turn()  # only the connector's news: the pull landed
    assert engine.pull_landed
    assert srv._poll_timeout(engine.stats()) == 0.0
    srv._turn()  # a step that still schedules nothing (no block): the stalled nap
    assert srv._poll_timeout(engine.stats()) == engine_server.STALLED_POLL_S


class WakingConnector:
    """A consumer connector that can wake the loop when a pull lands (set_pull_waker)."""

    is_consumer = True

    def __init__(self) -> None:
        self.wake = None

    def set_pull_waker(self, wake) -> None:
        self.wake = wake


def test_a_connector_that_wakes_the_loop_lets_it_sleep_longer_and_ends_its_sleep_when_a_pull_lands():
    engine = PullingEngine()
    ctx = zmq.Context()
    reporter = LoadReporter(worker_id="w", role="decode", engine_id="e", info={"block_size": 16})
    connector = WakingConnector()
    srv = EngineServer(
        engine, address="tcp://127.0.0.1:0", reporter=reporter, context=ctx, connector=connector
    )
    try:
        assert srv._poll_timeout(engine.stats()) == engine_server.PULL_WAKER_POLL_S
        assert connector.wake is not None
        assert not srv._poller.poll(0)  # nothing to read yet
        connector.wake()  # what the connector's I/O thread does when the pull lands
        ready = dict(srv._poller.poll(60_000))
        assert srv._wake_r.fileno() in ready
    finally:
        srv.close()
        ctx.term()
