"""Malformed, truncated and wrong-typed msgpack frames to a real worker's socket (a
`pdserve prefill` process on a tiny random Llama): hand-written ones, then hypothesis-
generated ones. The worker answers each with an ErrorMessage (400) naming what was
wrong, or serves it when the frame happens to be a valid request; it never crashes,
and it still serves a real request at the end."""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.protocol import (
    Abort,
    ErrorMessage,
    Hello,
    LoadReport,
    Message,
    ProtocolError,
    TokenDelta,
    decode_message,
)
from common.sampling_params import SamplingParams
from tests.harness.stack import WorkerProcess
from tests.harness.worker_client import (
    TINY_ENGINE_FLAGS,
    Client,
    kv_transfer_flag,
    tokens_of,
    write_tiny_model,
)

REPLY_TIMEOUT_S = 20.0
VOCAB = 512  # the tiny model's


def packb(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def generate(rid: str = "", **changes: Any) -> dict[str, Any]:
    body = {
        "type": "generate",
        "request_id": rid or f"fuzz-{uuid.uuid4().hex[:10]}",
        "prompt_token_ids": [1, 2, 3, 4],
        "sampling_params": {"max_tokens": 2, "temperature": 0.0},
    }
    body.update(changes)
    return body


def sampling(**changes: Any) -> dict[str, Any]:
    return generate(sampling_params={"max_tokens": 2, "temperature": 0.0, **changes})


VALID = packb(generate("valid"))

# (frame, a piece of the error message)
MALFORMED = [
    (b"", "not a msgpack message"),
    (b"\xc1", "not a msgpack message"),
    (VALID[:-7], "not a msgpack message"),  # truncated
    (VALID + b"\x00", "not a msgpack message"),  # trailing bytes
    (packb([1, 2, 3]), "must be a msgpack map"),
    (packb("generate"), "must be a msgpack map"),
    (packb({"request_id": "r"}), "unknown message type"),
    (packb({"type": "steal-weights", "request_id": "r"}), "unknown message type"),
    (packb({"type": 7, "request_id": "r"}), "unknown message type"),
    (packb({**generate(), "extra": 1}), "unknown fields"),
    (packb({k: v for k, v in generate().items() if k != "prompt_token_ids"}), "generate"),
    (packb(generate(request_id=5)), "request_id must be a string"),
    (packb(generate(request_id="r" * 5000)), "request_id must be a string"),
    (packb(generate(request_id=b"bytes-id")), "request_id must be a string"),
    (packb(generate(prompt_token_ids="1 2 3")), "prompt_token_ids"),
    (packb(generate(prompt_token_ids=[])), "prompt_token_ids"),
    (packb(generate(prompt_token_ids=[1, "2"])), "prompt_token_ids"),
    (packb(generate(prompt_token_ids=[1, -2])), "prompt_token_ids"),
    (packb(generate(prompt_token_ids=[1, True])), "prompt_token_ids"),
    (packb(generate(prompt_token_ids=[1, 2.5])), "prompt_token_ids"),
    (packb(generate(prompt_token_ids=[1, VOCAB])), "outside the model's vocabulary"),
    (packb(generate(prompt_token_ids=[2**64 - 1])), "outside the model's vocabulary"),
    (packb(generate(prompt_token_ids=[[1, 2]])), "prompt_token_ids"),
    (packb(generate(prompt_token_ids=[1] * 300)), "maximum context length"),
    (packb(generate(sampling_params="greedy")), "sampling_params must be a map"),
    (packb(generate(sampling_params=[0.0])), "sampling_params must be a map"),
    (packb(sampling(best_of=2)), "unknown fields"),
    (packb(sampling(temperature="hot")), "temperature"),
    (packb(sampling(temperature=float("nan"))), "temperature must be a finite number"),
    (packb(sampling(temperature=float("inf"))), "temperature must be a finite number"),
    (packb(sampling(top_p=float("-inf"))), "top_p must be a finite number"),
    (packb(sampling(max_tokens=0)), "max_tokens must be at least 1"),
    (packb(sampling(max_tokens=2**63)), "maximum context length"),
    (packb(sampling(max_tokens=2.0)), "max_tokens must be an int"),
    (packb(sampling(top_k=-7)), "top_k"),
    (packb(sampling(seed="x")), "seed must be an int"),
    (packb(sampling(ignore_eos=1)), "ignore_eos must be a bool"),
    (packb(sampling(stop_token_ids=[VOCAB])), "outside the vocabulary"),
    (packb(sampling(stop_token_ids="2")), "stop_token_ids"),
    (packb(sampling(logit_bias={"5": 1.0})), "logit_bias must map ints to numbers"),
    (packb(sampling(logit_bias={5: 1000.0})), "logit_bias"),
    (packb(sampling(logit_bias={VOCAB: 1.0})), "outside the vocabulary"),
    (packb(sampling(logprobs=10_000)), "logprobs"),
    (packb(sampling(min_tokens=5)), "min_tokens"),
    (packb(generate(priority="high")), "priority must be an int"),
    (packb(generate(cache_salt=17)), "cache_salt must be a string"),
    (packb(generate(prefill_only="yes")), "prefill_only must be a bool"),
    (packb(generate(kv_transfer_params=[1, 2])), "kv_transfer_params must be a map"),
    # a prefill worker pulls nothing: params naming a producer are refused, never dialled
    (packb(generate(kv_transfer_params={"remote_host": "127.0.0.1", "remote_port": 1})), "pulls blocks"),
    (packb({"type": "abort"}), "abort"),
    (packb({"type": "abort", "request_id": ["r"]}), "request_id must be a string"),
    (packb({"type": "hello", "router_id": 5}), "router_id must be a string"),
    (packb({"type": "delta", "request_id": "r", "token_ids": [1]}), "not 'delta'"),
    (packb({"type": "error", "request_id": "r", "code": 500, "message": "x"}), "not 'error'"),
    (packb({"type": "generate", "request_id": "r", **{str(i): i for i in range(2000)}}), "unknown fields"),
    (packb({1: "generate"}), "unknown message type"),
    (packb(msgpack.ExtType(5, b"xyz")), "must be a msgpack map"),
    (packb(generate(prompt_token_ids=msgpack.ExtType(1, b"\x00"))), "prompt_token_ids"),
    (b"\x91" * 100_000 + b"\xc0", "not a msgpack message"),  # arrays nested 100000 deep
    (b"\xdf\xff\xff\xff\xff", "not a msgpack message"),  # claims 4 billion map entries
    (b"\xdb\x7f\xff\xff\xff" + b"x" * 10, "not a msgpack message"),  # a string longer than the frame
]


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("frame-fuzz")
    model = write_tiny_model(workdir / "tiny")
    process = WorkerProcess(
        "prefill",
        ["--model", str(model), *TINY_ENGINE_FLAGS, *kv_transfer_flag("TcpConnector", "kv_producer")],
        workdir,
    )
    try:
        yield process.ready()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def client(worker):
    client = Client(worker.address)
    yield client
    client.close()


def answer(client: Client, frame: bytes, timeout_s: float = REPLY_TIMEOUT_S) -> list[Message]:
    """What the worker answers to `frame`: one error, or a whole stream if it was a valid
    request, or a load report for a hello; nothing within `timeout_s` gives []."""
    client.send_raw(frame)
    reply = client.next_message(lambda m: True, timeout_s) if _any_reply(client, timeout_s) else None
    if reply is None:
        return []
    replies = [reply]
    while isinstance(reply, TokenDelta) and reply.finish_reason is None and reply.kv_transfer_params is None:
        reply = client.next_for(reply.request_id, REPLY_TIMEOUT_S)
        replies.append(reply)
    return replies


def _any_reply(client: Client, timeout_s: float) -> bool:
    """Whether a message other than a load report arrives (load reports, sent to anyone who
    said hello, are dropped)."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        message = client.receive(left)
        if message is None:
            return False
        if not isinstance(message, LoadReport):
            client.inbox.append(message)
            return True
    return False


def assert_alive_and_serving(worker: WorkerProcess, client: Client) -> None:
    assert worker.proc.poll() is None, worker.tail()
    rid = f"alive-{uuid.uuid4().hex[:8]}"
    client.generate(rid, [5, 6, 7], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert len(tokens_of(client.stream(rid))) == 3


@pytest.mark.parametrize(("frame", "says"), MALFORMED, ids=[f"frame{i}" for i in range(len(MALFORMED))])
def test_a_malformed_frame_is_answered_with_an_error(client, frame, says):
    (reply,) = answer(client, frame)
    assert isinstance(reply, ErrorMessage), reply
    assert reply.code == 400
    assert says in reply.message, reply.message


def test_an_error_names_the_request_when_its_id_can_be_read(client):
    (reply,) = answer(client, packb(generate("mine-42", prompt_token_ids="oops")))
    assert isinstance(reply, ErrorMessage) and reply.request_id == "mine-42"


def test_several_frames_in_one_message_are_refused(client):
    client.send_raw(VALID, VALID)
    reply = client.receive(REPLY_TIMEOUT_S)
    assert isinstance(reply, ErrorMessage) and "one frame" in reply.message


def test_a_duplicate_request_id_is_refused_while_the_first_runs(client):
    rid = f"twice-{uuid.uuid4().hex[:8]}"
    body = packb(generate(rid, sampling_params={"max_tokens": 200, "temperature": 0.0, "ignore_eos": True}))
    client.send_raw(body)
    client.send_raw(body)
    # a busy worker may step the first request (a token or more) before it reads the second
    error = client.next_message(lambda m: isinstance(m, ErrorMessage) and m.request_id == rid)
    assert "already running" in error.message, error
    assert len(tokens_of(client.stream(rid))) == 200  # the first one ran to its end


def test_an_oversized_frame_is_answered_or_dropped_and_the_worker_lives(worker, client):
    client.send_raw(b"\x00" * (65 * 1024 * 1024))  # over the 64 MiB a message may have
    reply = client.receive(REPLY_TIMEOUT_S)
    assert reply is None or (isinstance(reply, ErrorMessage) and "larger than" in reply.message)
    assert_alive_and_serving(worker, client)


# -- generated frames ---------------------------------------------------------------------------

json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)  # fmt: skip
FIELDS = ["request_id", "prompt_token_ids", "sampling_params", "priority", "cache_salt", "prefill_only",
          "kv_transfer_params"]  # fmt: skip
SAMPLING_FIELDS = list(SamplingParams.__dataclass_fields__)


@st.composite
def mutated_generate(draw) -> bytes:
    """A valid generate message with some fields replaced, dropped or added: mostly wrong."""
    body = generate(f"gen-{uuid.uuid4().hex[:10]}")
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["replace", "drop", "add", "sampling"]))
        if action == "replace":
            value = draw(json_like)
            field = draw(st.sampled_from(FIELDS))
            if field == "kv_transfer_params" and isinstance(value, dict):
                value.pop("remote_host", None)  # never make a worker dial a generated address
            body[field] = value
        elif action == "drop":
            body.pop(draw(st.sampled_from(FIELDS)), None)
        elif action == "add":
            body[draw(st.text(min_size=1, max_size=10))] = draw(json_like)
        else:
            params = dict(body["sampling_params"]) if isinstance(body.get("sampling_params"), dict) else {}
            params[draw(st.sampled_from(SAMPLING_FIELDS))] = draw(json_like)
            body["sampling_params"] = params
    return packb(body)


@st.composite
def truncated(draw) -> bytes:
    frame = draw(mutated_generate())
    return frame[: draw(st.integers(0, max(0, len(frame) - 1)))]


frames = (
    st.binary(max_size=200)
    | json_like.map(packb)
    | mutated_generate()
    | truncated()
    | st.builds(lambda t, rest: packb({"type": t, **rest}),
                st.sampled_from(["generate", "abort", "hello", "delta", "error", "load"]),
                st.dictionaries(st.sampled_from(FIELDS + ["router_id", "token_ids", "code"]), json_like, max_size=4))
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(frame=frames)
def test_generated_frames_get_an_error_or_a_real_answer(client, frame):
    try:
        valid = decode_message(frame)
    except ProtocolError:
        valid = None
    if isinstance(valid, Abort | Hello):  # an abort of nothing has no answer; a hello, a load report
        assert answer(client, frame, timeout_s=0.3) == []
        return
    replies = answer(client, frame)
    assert replies, f"the worker did not answer {frame[:60]!r}"
    if isinstance(replies[0], ErrorMessage):
        assert len(replies) == 1 and replies[0].code == 400, replies
    else:  # the mutation left a valid request (or one the engine refuses later): served to its end
        assert all(isinstance(r, TokenDelta) for r in replies[:-1]), replies
        last = replies[-1]
        assert isinstance(last, ErrorMessage) or last.finish_reason is not None or last.kv_transfer_params


def test_after_all_that_the_worker_still_serves(worker, client):
    assert_alive_and_serving(worker, client)
