"""Harness for the worker tests: real `pdserve prefill` / `pdserve decode` processes and
a test client that speaks common/protocol over a ZMQ DEALER, as the router does.

Every wait is bounded: a worker that does not come up, or a stream that does not end,
fails the test with the worker's log instead of hanging it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import zmq

from common.protocol import (
    ErrorMessage,
    GenerateRequest,
    Hello,
    LoadReport,
    Message,
    TokenDelta,
    decode_message,
    encode_message,
    sampling_params_to_wire,
)
from common.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0  # a cold start imports torch and loads the model
STREAM_TIMEOUT_S = 60.0

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
# the tiny model's engine flags: random weights of a fixed seed, a small cache
TINY_ENGINE_FLAGS = [
    "--load-format", "dummy", "--seed", "0", "--device", "cpu", "--block-size", "8",
    "--max-model-len", "256", "--num-gpu-blocks-override", "96",
]  # fmt: skip


def write_tiny_model(folder: Path) -> Path:
    """A Llama folder with only config.json: workers load it with --load-format dummy."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    return folder


def kv_transfer_flag(connector: str, role: str, policy: str = "fail", **extra: Any) -> list[str]:
    config = {
        "kv_connector": connector,
        "kv_role": role,
        "kv_port": 0,  # a free side-channel port for each producer
        "kv_load_failure_policy": policy,
        "kv_connector_extra_config": extra,
    }
    return ["--kv-transfer-config", json.dumps(config)]


class Worker:
    """A worker process started with `pdserve <role> ARGS`, serving once ready() returns."""

    def __init__(self, role: str, args: list[str], workdir: Path) -> None:
        self.role = role
        self.ready_file = workdir / f"{role}-{uuid.uuid4().hex[:8]}.json"
        self.log = tempfile.NamedTemporaryFile(prefix=f"pdserve-{role}-", suffix=".log", delete=False)
        command = [
            sys.executable, "-m", "pdserve.cli.main", role, *args,
            "--worker-address", "tcp://127.0.0.1:0", "--ready-file", str(self.ready_file), "--metrics-port", "0",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(command, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.info: dict[str, Any] = {}

    def ready(self, timeout: float = START_TIMEOUT_S) -> Worker:
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the {self.role} worker exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"the {self.role} worker did not start in {timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        self.info = json.loads(self.ready_file.read_text())
        return self

    @property
    def address(self) -> str:
        return self.info["address"]

    def metrics(self) -> dict[str, float]:
        """The worker's /metrics as {series (name and labels, as written): value}."""
        url = f"http://127.0.0.1:{self.info['metrics_port']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                values[series] = float(value)
        return values

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the series of `name` whose labels include `labels`."""
        total = 0.0
        for series, value in self.metrics().items():
            base, _, rest = series.partition("{")
            if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
                total += value
        return total

    def log_tail(self, lines: int = 60) -> str:
        text = Path(self.log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it lingers; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Client:
    """A router's view of one worker: a DEALER socket speaking common/protocol."""

    def __init__(self, address: str, context: zmq.Context | None = None) -> None:
        self.socket = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.inbox: list[Message] = []  # received, not yet taken

    def close(self) -> None:
        self.socket.close(linger=0)

    def send(self, msg: Message) -> None:
        self.socket.send(encode_message(msg))

    def send_raw(self, *frames: bytes) -> None:
        self.socket.send_multipart(list(frames))

    def hello(self, router_id: str = "test-router") -> None:
        self.send(Hello(router_id=router_id))

    def generate(
        self,
        rid: str,
        prompt: list[int],
        params: SamplingParams,
        *,
        prefill_only: bool = False,
        kv_transfer_params: dict | None = None,
    ) -> None:
        self.send(
            GenerateRequest(
                request_id=rid,
                prompt_token_ids=list(prompt),
                sampling_params=sampling_params_to_wire(params),
                prefill_only=prefill_only,
                kv_transfer_params=kv_transfer_params,
            )
        )

    def receive(self, timeout: float) -> Message | None:
        if self.socket.poll(int(timeout * 1000)):
            return decode_message(self.socket.recv())
        return None

    def next_message(self, predicate, timeout: float = STREAM_TIMEOUT_S) -> Message:
        """The first message (received earlier or now) that satisfies `predicate`."""
        for i, msg in enumerate(self.inbox):
            if predicate(msg):
                return self.inbox.pop(i)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            msg = self.receive(left)
            if msg is None:
                break
            if predicate(msg):
                return msg
            self.inbox.append(msg)
        raise TimeoutError(f"no matching message in {timeout:.0f} s; got meanwhile {self.inbox[-5:]}")

    def next_for(self, rid: str, timeout: float = STREAM_TIMEOUT_S) -> TokenDelta | ErrorMessage:
        return self.next_message(
            lambda m: isinstance(m, TokenDelta | ErrorMessage) and m.request_id == rid, timeout
        )

    def stream(self, rid: str, timeout: float = STREAM_TIMEOUT_S) -> list[TokenDelta | ErrorMessage]:
        """Every message for `rid` up to its last (finish_reason set, kv params, or an error)."""
        deadline = time.monotonic() + timeout
        messages = []
        while True:
            msg = self.next_for(rid, max(0.0, deadline - time.monotonic()))
            messages.append(msg)
            if isinstance(msg, ErrorMessage) or msg.finish_reason is not None or msg.kv_transfer_params:
                return messages

    def load_report(self, timeout: float = 5.0) -> LoadReport:
        return self.next_message(lambda m: isinstance(m, LoadReport), timeout)


def tokens_of(messages: list[TokenDelta | ErrorMessage]) -> list[int]:
    errors = [m for m in messages if isinstance(m, ErrorMessage)]
    assert not errors, f"the worker answered with errors: {errors}"
    return [t for m in messages for t in m.token_ids]


def prefill_then_decode(
    prefill: Client, decode: Client, rid: str, prompt: list[int], params: SamplingParams
) -> tuple[list[int], TokenDelta]:
    """The router's remote-prefill flow: (every token, first one included; P's answer)."""
    prefill.generate(rid, prompt, params, prefill_only=True)
    (answer,) = prefill.stream(rid)
    assert isinstance(answer, TokenDelta), answer
    first = answer.token_ids
    if answer.kv_transfer_params is None:  # the first token already ended it
        return first, answer
    decode.generate(
        rid, prompt, params, kv_transfer_params={**answer.kv_transfer_params, "first_token_id": first[0]}
    )
    return first + tokens_of(decode.stream(rid)), answer


def wait_until(condition, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout:.0f} s")
        time.sleep(interval)
