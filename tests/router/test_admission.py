"""Admission control: a bounded number of requests in flight, a bounded FIFO queue behind
them, 429 with Retry-After beyond both or after too long a wait, and every slot given back."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest

from common.protocol import LoadReport
from router.admission import (
    DEFAULT_WORKER_MAX_NUM_SEQS,
    AdmissionControl,
    AdmissionLimits,
    ClientGone,
    TooManyRequests,
    decode_capacity,
)
from tests.router.app_harness import assert_openai_error, embedded_tokenizer, running_router, served_model
from tests.router.fake_worker import FakeWorker


def run(coro):
    return asyncio.run(coro)


def test_requests_beyond_the_limit_wait_in_arrival_order_and_get_the_freed_slots():
    async def scenario():
        admission = AdmissionControl(AdmissionLimits(max_in_flight=2, max_queued=3))
        first, second = await admission.admit(), await admission.admit()
        order = []

        async def queued(name):
            slot = await admission.admit()
            order.append(name)
            return slot

        waiters = [asyncio.ensure_future(queued(n)) for n in ("a", "b", "c")]
        await asyncio.sleep(0.01)
        assert (admission.in_flight, admission.queued) == (2, 3)
        first.release()
        first.release()  # twice is harmless
        await asyncio.sleep(0.01)
        assert order == ["a"] and admission.in_flight == 2
        second.release()
        (await waiters[0]).release()
        await asyncio.sleep(0.01)
        assert order == ["a", "b", "c"]
        for waiter in waiters[1:]:
            (await waiter).release()
        assert (admission.in_flight, admission.queued) == (0, 0)

    run(scenario())


def test_a_full_queue_refuses_at_once_with_429_and_retry_after():
    async def scenario():
        admission = AdmissionControl(AdmissionLimits(max_in_flight=1, max_queued=1))
        await admission.admit()
        waiting = asyncio.ensure_future(admission.admit())
        await asyncio.sleep(0.01)
        with pytest.raises(TooManyRequests) as refused:
            admission.check_room()
        with pytest.raises(TooManyRequests):
            await admission.admit()
        assert refused.value.status == 429 and refused.value.retry_after_s >= 1
        assert "--max-queued-requests 1" in refused.value.message
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert admission.queued == 0 and admission.in_flight == 1

    run(scenario())


def test_a_queued_request_that_waits_too_long_gets_429_and_leaves_the_queue():
    async def scenario():
        admission = AdmissionControl(AdmissionLimits(max_in_flight=1, max_queued=5, max_queue_wait_s=0.05))
        await admission.admit()
        with pytest.raises(TooManyRequests) as refused:
            await admission.admit()
        assert "--max-queue-wait" in refused.value.message
        assert admission.queued == 0 and admission.in_flight == 1

    run(scenario())


def test_a_client_that_leaves_the_queue_takes_no_slot():
    async def scenario():
        admission = AdmissionControl(AdmissionLimits(max_in_flight=1, max_queued=5))
        held = await admission.admit()
        left = asyncio.Event()
        waiting = asyncio.ensure_future(admission.admit(left.wait))
        await asyncio.sleep(0.01)
        left.set()
        with pytest.raises(ClientGone):
            await waiting
        held.release()
        assert (admission.in_flight, admission.queued) == (0, 0)

    run(scenario())


def test_zero_queue_refuses_whatever_cannot_start_now():
    async def scenario():
        admission = AdmissionControl(AdmissionLimits(max_in_flight=1, max_queued=0))
        await admission.admit()
        with pytest.raises(TooManyRequests):
            await admission.admit()

    run(scenario())


def _client(max_num_seqs):
    return SimpleNamespace(last_report=LoadReport(max_num_seqs=max_num_seqs or 0))


def test_the_default_limit_is_the_decode_workers_max_num_seqs_summed():
    pool = SimpleNamespace(routable=lambda role: [_client(8), _client(24), _client(None)])
    admission = AdmissionControl(AdmissionLimits(), capacity=decode_capacity(pool))
    assert admission.limit == 8 + 24 + DEFAULT_WORKER_MAX_NUM_SEQS
    assert admission.queue_limit == admission.limit
    assert AdmissionControl(AdmissionLimits(max_in_flight=3, max_queued=7), decode_capacity(pool)).limit == 3
    nobody = SimpleNamespace(routable=lambda role: [])
    assert AdmissionControl(AdmissionLimits(), decode_capacity(nobody)).limit == DEFAULT_WORKER_MAX_NUM_SEQS


def test_a_queued_stream_is_answered_once_a_slot_frees_and_429s_carry_retry_after():
    tokenizer = embedded_tokenizer()
    slow = FakeWorker(script=lambda prompt: list(range(1000, 1010)), token_interval_s=0.05)
    with running_router(
        served_model(tokenizer), [slow], max_concurrent_requests=1, max_queued_requests=1
    ) as live:
        body = {"prompt": "hi", "max_tokens": 10, "stream": True}

        async def clients():
            async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:

                async def one():
                    async with http.stream("POST", "/v1/completions", json=body) as response:
                        return (
                            response.status_code,
                            response.headers.get("retry-after"),
                            await response.aread(),
                        )

                return await asyncio.gather(*(one() for _ in range(4)))

        results = asyncio.run(clients())
        answered = [r for r in results if r[0] == 200]
        refused = [r for r in results if r[0] == 429]
        assert len(answered) >= 2 and len(answered) + len(refused) == 4
        assert all(r[2].rstrip().endswith(b"data: [DONE]") for r in answered)
        assert all(r[1] is not None and int(r[1]) >= 1 for r in refused)
        for _, _, text in refused:
            assert_openai_error(httpx.Response(429, content=text), 429)
        assert slow.wait_for(lambda: live.context.admission.in_flight == 0)
        assert live.context.admission.queued == 0
