"""Real `pdserve prefill` / `pdserve decode` processes given --cluster-secret-file: a
client without the secret (or with another one) gets nothing from them, neither on the
worker socket nor on the KV side channel; one with it runs the disaggregated flow
(prefill, pull over the TCP side channel, decode); a replayed frame is dropped."""

from __future__ import annotations

import uuid

import msgpack
import pytest
import zmq

from common.frame_auth import WORKER_CHANNEL, FrameAuth
from common.protocol import (
    GenerateRequest,
    LoadReport,
    Message,
    decode_message,
    encode_message,
    sampling_params_to_wire,
)
from common.sampling_params import SamplingParams
from tests.harness import worker_client as wc
from tests.harness.stack import running_pair, wait_until

SECRET = b"a-cluster-secret-for-the-tests-0123456789"
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
QUIET_S = 2.0  # how long a refused client waits to be sure nothing comes back


class SealedClient(wc.Client):
    """The harness client, sealing what it sends and opening what it receives with `auth`."""

    def __init__(self, address: str, auth: FrameAuth) -> None:
        super().__init__(address)
        self.auth = auth
        self.sent: list[bytes] = []

    def send(self, msg: Message) -> None:
        frame = self.auth.seal(encode_message(msg))
        self.sent.append(frame)
        self.socket.send(frame)

    def receive(self, timeout: float) -> Message | None:
        if self.socket.poll(int(timeout * 1000)):
            return decode_message(self.auth.open(self.socket.recv()))
        return None


def nothing_arrives(socket: zmq.Socket, seconds: float = QUIET_S) -> bool:
    return socket.poll(int(seconds * 1000)) == 0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("secret-workers")


@pytest.fixture(scope="module")
def workers(workdir):
    secret_file = workdir / "cluster-secret"
    secret_file.write_bytes(SECRET + b"\n")
    secret_file.chmod(0o600)
    flags = ["--model", str(wc.write_tiny_model(workdir / "tiny")), *wc.TINY_ENGINE_FLAGS,
             "--cluster-secret-file", str(secret_file)]  # fmt: skip
    with running_pair(
        workdir,
        [*flags, *wc.kv_transfer_flag("TcpConnector", "kv_producer")],
        [*flags, *wc.kv_transfer_flag("TcpConnector", "kv_consumer", transfer_timeout_s=10)],
    ) as pair:
        yield pair


@pytest.fixture
def sealed(workers):
    prefill, decode = workers
    p = SealedClient(prefill.address, FrameAuth(SECRET, WORKER_CHANNEL))
    d = SealedClient(decode.address, FrameAuth(SECRET, WORKER_CHANNEL))
    yield p, d
    p.close()
    d.close()


def test_with_the_secret_the_disaggregated_flow_runs_over_the_authenticated_side_channel(workers, sealed):
    p, d = sealed
    d.hello()
    assert isinstance(d.load_report(), LoadReport)
    tokens, answer = wc.prefill_then_decode(p, d, "sealed-1", wc.random_prompt(1, 40), GREEDY)
    assert answer.kv_transfer_params is not None  # the blocks were pulled from P, not recomputed
    assert len(tokens) == GREEDY.max_tokens
    # the blocks came over the side channel (a failed pull would count as failed, and fail the request)
    decode = workers[1]
    assert decode.metric("vllm:nixl_xfer_time_seconds_count") >= 1
    assert decode.metric("vllm:nixl_num_failed_transfers_total") == 0
    assert "unauthenticated" not in decode.tail(400) + workers[0].tail(400)


@pytest.mark.parametrize(
    "secret", [None, b"another-secret-of-enough-length"], ids=["no secret", "wrong secret"]
)
def test_a_client_without_the_secret_gets_no_answer_and_is_counted(workers, secret):
    decode = workers[1]
    client = (
        wc.Client(decode.address)
        if secret is None
        else SealedClient(decode.address, FrameAuth(secret, WORKER_CHANNEL))
    )
    try:
        client.hello()
        client.generate(f"stranger-{uuid.uuid4().hex[:6]}", wc.random_prompt(2, 10), GREEDY)
        client.send_raw(b"\xc1 not even msgpack")
        assert nothing_arrives(client.socket)
    finally:
        client.close()
    wait_until(lambda: "unauthenticated message" in decode.tail(400), 5, "the worker to log the drop")


def test_a_replayed_generate_frame_is_dropped(workers, sealed):
    _, d = sealed
    rid = "replayed"
    d.generate(rid, wc.random_prompt(3, 12), GREEDY)
    assert len(wc.tokens_of(d.stream(rid))) == GREEDY.max_tokens
    d.socket.send(d.sent[-1])  # the same bytes again, as a captured frame would be
    assert nothing_arrives(d.socket)
    # the worker still serves the genuine client
    d.generate("after-replay", wc.random_prompt(4, 12), GREEDY)
    assert len(wc.tokens_of(d.stream("after-replay"))) == GREEDY.max_tokens


def test_the_kv_side_channel_ignores_a_consumer_without_the_secret(workers, sealed):
    prefill = workers[0]
    host, _, port = prefill.info["kv_side_channel"].rpartition(":")
    p, _ = sealed
    p.generate("leased", wc.random_prompt(5, 40), GREEDY, prefill_only=True)
    (answer,) = p.stream("leased")
    params = answer.kv_transfer_params
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(f"tcp://{host}:{port}")
    try:
        # a stranger asks for the leased blocks, and to release them: no answer to either
        for message in (
            {"type": "read", "xid": 1, "request_id": params["remote_request_id"], "block_ids": params["remote_block_ids"]},
            {"type": "done", "xid": 2, "request_id": params["remote_request_id"]},
        ):  # fmt: skip
            socket.send(msgpack.packb(message))
            assert nothing_arrives(socket)
    finally:
        socket.close(linger=0)
    wait_until(lambda: "unauthenticated KV side-channel message" in prefill.tail(400), 5, "the drop logged")


def test_an_unsealed_generate_request_is_not_run(workers):
    """Not even its errors come back: the worker cannot tell who sent it."""
    client = wc.Client(workers[1].address)
    try:
        request = GenerateRequest("unsealed", wc.random_prompt(6, 8), sampling_params_to_wire(GREEDY))
        client.socket.send(encode_message(request))
        assert nothing_arrives(client.socket)
    finally:
        client.close()
