"""A router's view of one worker process, for the worker tests: a DEALER socket speaking
common/protocol, the remote-prefill flow a router drives, and the tiny model's flags.
Every receive is bounded: a stream that does not end fails with what did arrive."""

from __future__ import annotations

import json
import random
import time
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
from tests.tiny_llama import tiny_hf_config

STREAM_TIMEOUT_S = 60.0
# the tiny model's engine flags: random weights of a fixed seed, a small cache
TINY_ENGINE_FLAGS = [
    "--load-format", "dummy", "--seed", "0", "--device", "cpu", "--block-size", "8",
    "--max-model-len", "256", "--num-gpu-blocks-override", "96",
]  # fmt: skip


def write_tiny_model(folder: Path) -> Path:
    """A Llama folder with only config.json: workers load it with --load-format dummy."""
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_hf_config(
        vocab_size=512, intermediate_size=128, max_position_embeddings=512, torch_dtype="float32"
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def random_prompt(seed: int, n: int) -> list[int]:
    """`n` token ids of the tiny model's vocabulary, the same for the same seed."""
    rng = random.Random(seed)
    return [rng.randrange(1, 512) for _ in range(n)]


def kv_transfer_flag(connector: str, role: str, policy: str = "fail", **extra: Any) -> list[str]:
    config = {
        "kv_connector": connector,
        "kv_role": role,
        "kv_port": 0,  # a free side-channel port for each producer
        "kv_load_failure_policy": policy,
        "kv_connector_extra_config": extra,
    }
    return ["--kv-transfer-config", json.dumps(config)]


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
