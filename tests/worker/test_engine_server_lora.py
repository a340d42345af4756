"""The worker loop's side of LoRA: a generate's adapter reaches the engine, an adapter the
engine cannot load fails that request with the engine's status, load_lora and
unload_lora are answered with a LoRAResult, and the load reports name the adapters the
engine holds (a change of them is reported like a change of load)."""

from __future__ import annotations

import pytest
import zmq

from common.engine.llm_engine import EngineStats
from common.lora.lora_request import LoRARequest
from common.protocol import (
    ErrorMessage,
    GenerateRequest,
    Hello,
    LoadLoRA,
    LoadReport,
    LoRAResult,
    UnloadLoRA,
    decode_message,
    encode_message,
)
from common.worker.engine_server import EngineServer
from common.worker.load_reports import HEARTBEAT_S, MIN_INTERVAL_S, LoadReporter
from tests.harness.manual_clock import ManualClock

ROUTER = b"router-identity"


class AdapterError(ValueError):
    """What the engine's LoRAError is to the loop: a ValueError with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class AdapterEngine:
    """An engine that holds adapters by name; folders under /missing do not exist and
    folders under /bad hold an adapter it refuses."""

    def __init__(self) -> None:
        self.held: list[str] = []
        self.added: list[tuple[str, LoRARequest | None]] = []

    def _check(self, lora: LoRARequest) -> None:
        if lora.path.startswith("/missing"):
            raise AdapterError(404, f"No adapter found at {lora.path}")
        if lora.path.startswith("/bad"):
            raise AdapterError(400, f"LoRA adapter {lora.name!r}: rank 64 is above --max-lora-rank 16")

    def load_lora(self, lora: LoRARequest) -> None:
        self._check(lora)
        if lora.name not in self.held:
            self.held.append(lora.name)

    def unload_lora(self, name: str) -> bool:
        if name not in self.held:
            return False
        self.held.remove(name)
        return True

    def lora_names(self) -> list[str]:
        return list(self.held)

    def add_request(self, request_id, prompt, params, *, lora_request=None, **kwargs) -> None:
        if lora_request is not None:
            self.load_lora(lora_request)
        self.added.append((request_id, lora_request))

    def stats(self) -> EngineStats:
        zero = dict.fromkeys(
            ("num_running", "num_waiting", "prefix_cache_queries", "prefix_cache_hits", "num_preemptions",
             "num_prompt_tokens", "num_generation_tokens", "num_steps"),
            0,
        )  # fmt: skip
        return EngineStats(**zero, kv_cache_usage=0.0, num_waiting_for_remote_kv=0)


@pytest.fixture
def served():
    engine = AdapterEngine()
    ctx = zmq.Context()
    reporter = LoadReporter(worker_id="w", role="decode", engine_id="e")
    server = EngineServer(engine, address="tcp://127.0.0.1:0", reporter=reporter, context=ctx)
    sent: list = []
    server._send_raw = lambda identity, payload: sent.append(decode_message(payload))  # type: ignore[method-assign]
    yield server, engine, sent
    server.close()
    ctx.term()


def _handle(server: EngineServer, message) -> None:
    server._handle(ROUTER, encode_message(message))


def _generate(rid: str, lora: dict | None) -> GenerateRequest:
    return GenerateRequest(rid, [1, 2, 3], {"max_tokens": 4}, lora=lora)


def test_a_generate_naming_an_adapter_hands_it_to_the_engine(served):
    server, engine, sent = served
    _handle(server, _generate("r1", {"name": "sql", "path": "/adapters/sql", "id": 3}))
    _handle(server, _generate("r2", None))
    assert engine.added == [("r1", LoRARequest("sql", "/adapters/sql", 3)), ("r2", None)]
    assert sent == []  # both taken: the answers are their tokens


@pytest.mark.parametrize("path, status", [("/missing/sql", 404), ("/bad/sql", 400)])
def test_an_adapter_the_engine_cannot_load_fails_the_request_with_its_status(served, path, status):
    server, engine, sent = served
    _handle(server, _generate("r1", {"name": "sql", "path": path, "id": 1}))
    (error,) = sent
    assert isinstance(error, ErrorMessage) and (error.request_id, error.code) == ("r1", status)
    assert path in error.message or "rank 64" in error.message
    assert engine.added == []


def test_load_and_unload_lora_are_answered_with_lora_results(served):
    server, engine, sent = served
    _handle(server, LoadLoRA("l1", {"name": "sql", "path": "/adapters/sql", "id": 1}))
    _handle(server, LoadLoRA("l2", {"name": "big", "path": "/bad/big", "id": 2}))
    _handle(server, LoadLoRA("l3", {"name": "gone", "path": "/missing/gone", "id": 3}))
    _handle(server, UnloadLoRA("u1", "sql"))
    _handle(server, UnloadLoRA("u2", "sql"))
    assert [(m.request_id, m.ok, m.code) for m in sent] == [
        ("l1", True, 200), ("l2", False, 400), ("l3", False, 404), ("u1", True, 200), ("u2", False, 404),
    ]  # fmt: skip
    assert all(isinstance(m, LoRAResult) for m in sent)
    assert "rank 64" in sent[1].message and "/missing/gone" in sent[2].message
    assert engine.held == []


def test_load_reports_name_the_adapters_the_engine_holds(served):
    server, engine, sent = served
    engine.held = ["sql", "chat"]
    _handle(server, Hello("router-1"))
    (report,) = sent
    assert isinstance(report, LoadReport) and report.loras == ["sql", "chat"]


def test_a_change_of_adapters_is_reported_like_a_change_of_load():
    clock = ManualClock(100.0)
    reporter = LoadReporter(worker_id="w", role="decode", engine_id="e", clock=clock)
    reporter.add_router(b"id", "router-1")
    stats = AdapterEngine().stats()
    assert reporter.due(stats).loras == []
    clock.now += 2 * MIN_INTERVAL_S
    assert reporter.due(stats) is None  # nothing changed: wait for the heartbeat
    reporter.loras = ["sql"]
    assert 0 <= reporter.seconds_until_due(stats) < HEARTBEAT_S / 2
    assert reporter.due(stats).loras == ["sql"]
