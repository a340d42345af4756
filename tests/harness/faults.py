"""What the fault tests add on top of the process stack: the engine flags of their small
CPU model, KV events on loopback, router metrics by worker, and a streaming client watched
from a thread, so a test can kill, cut or stall something while a stream is under way."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import httpx

from tests.harness.stack import metric

ENGINE_FLAGS = [
    "--dtype", "float32", "--device", "cpu", "--max-model-len", "1024", "--num-gpu-blocks-override", "256",
]  # fmt: skip


def events_config(host: str = "127.0.0.1") -> str:
    return json.dumps(
        {"enable_kv_cache_events": True, "endpoint": f"tcp://{host}:*", "replay_endpoint": f"tcp://{host}:*"}
    )


def routed(router_url: str, worker: str) -> float:
    return metric(router_url, "pdserve_router_requests_routed_total", worker=worker)


def index_blocks(router_url: str, worker: str) -> float:
    return metric(router_url, "pdserve_router_prefix_index_blocks", worker=worker)


@dataclass
class StreamResult:
    """What one streaming client saw: each `data:` payload (JSON or "[DONE]") in order."""

    events: list = field(default_factory=list)
    first_chunk: threading.Event = field(default_factory=threading.Event)
    finished_at: float | None = None
    failure: BaseException | None = None

    @property
    def errors(self) -> list[dict]:
        return [e["error"] for e in self.events if isinstance(e, dict) and "error" in e]

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    @property
    def chunks(self) -> list[dict]:
        return [e for e in self.events if isinstance(e, dict) and "choices" in e]


def stream_in_background(url: str, body: dict, timeout_s: float) -> tuple[StreamResult, threading.Thread]:
    """POST a streaming /v1/completions in a thread; the result fills as events arrive."""
    result = StreamResult()

    def run() -> None:
        try:
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                              timeout=timeout_s) as response:  # fmt: skip
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    result.events.append(data if data == "[DONE]" else json.loads(data))
                    if "choices" in result.events[-1]:
                        result.first_chunk.set()
        except BaseException as exc:  # noqa: BLE001 - recorded for the test to report
            result.failure = exc
        finally:
            result.finished_at = time.monotonic()
            result.first_chunk.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return result, thread


def complete(
    url: str, prompt: str | list[int], max_tokens: int = 4, timeout_s: float = 120.0
) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, timeout=timeout_s)
