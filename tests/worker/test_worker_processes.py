"""A prefill and a decode worker as real processes on a tiny random Llama, driven over ZMQ
the way the router drives them: the remote-prefill flow, prefix reuse on the decode
side, abort, malformed input, load reports, KV events, lease expiry, and a prefill
worker killed with requests in flight.

Greedy tokens are compared with an aggregated LLMEngine in this process on the same
random weights (--load-format dummy, seed 0); the embedded model's parity with both
connectors is in test_disaggregated_parity.py.
"""

from __future__ import annotations

import json
import time

import msgpack
import pytest
import zmq

from common.protocol import (
    Abort,
    ErrorMessage,
    GenerateRequest,
    TokenDelta,
    encode_message,
    sampling_params_to_wire,
)
from common.sampling_params import SamplingParams
from tests.common import vllm_kv_events as vllm
from tests.common.vllm_kv_events import int_hash, reference_chain
from tests.harness.stack import WorkerProcess, running_pair, wait_until
from tests.harness.worker_client import (
    TINY_ENGINE_FLAGS,
    Client,
    kv_transfer_flag,
    prefill_then_decode,
    random_prompt,
    tokens_of,
    write_tiny_model,
)

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
LEASE_S = 5
KV_EVENTS = json.dumps(
    {"enable_kv_cache_events": True, "endpoint": "tcp://127.0.0.1:*", "replay_endpoint": "tcp://127.0.0.1:*"}
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("workers")


@pytest.fixture(scope="module")
def tiny_model(workdir):
    return write_tiny_model(workdir / "tiny")


def model_flags(tiny_model) -> list[str]:
    return ["--model", str(tiny_model), *TINY_ENGINE_FLAGS]


@pytest.fixture(scope="module")
def workers(tiny_model, workdir):
    """(prefill, decode): leases of 5 s on P; recompute on D, whose pulls give up after 5 s.
    D publishes KV events and hashes with sha256_cbor, started without PYTHONHASHSEED: its
    hashes must then be the ones a vLLM 0.33 worker computes for the same tokens."""
    with pytest.MonkeyPatch.context() as env:
        env.delenv("PYTHONHASHSEED", raising=False)
        with running_pair(
            workdir,
            [
                *model_flags(tiny_model),
                *kv_transfer_flag("TcpConnector", "kv_producer", kv_lease_duration=LEASE_S),
            ],
            [
                *model_flags(tiny_model),
                *kv_transfer_flag("TcpConnector", "kv_consumer", "recompute", transfer_timeout_s=5),
                "--kv-events-config",
                KV_EVENTS,
                "--prefix-caching-hash-algo",
                "sha256_cbor",
            ],
        ) as pair:
            yield pair


@pytest.fixture
def clients(workers):
    prefill, decode = workers
    p, d = Client(prefill.address), Client(decode.address)
    yield p, d
    p.close()
    d.close()


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Greedy tokens of the aggregated engine on the same random weights."""
    from common.config.engine_config import EngineConfig
    from common.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_config(
        EngineConfig(
            model=str(tiny_model),
            load_format="dummy",
            seed=0,
            device="cpu",
            block_size=8,
            max_model_len=256,
            num_gpu_blocks_override=96,
        )
    )
    return lambda prompts, params=GREEDY: engine.generate(prompts, params)


def test_remote_prefill_then_decode_streams_the_aggregated_greedy_tokens(clients, reference):
    p, d = clients
    prompts = [random_prompt(1, 5), random_prompt(2, 37), random_prompt(3, 64)]
    expected = reference(prompts)
    for i, text in enumerate(prompts):
        tokens, answer = prefill_then_decode(p, d, f"flow-{i}", text, GREEDY)
        assert answer.finish_reason is None and answer.num_prompt_tokens == len(text)
        assert len(answer.kv_transfer_params["remote_block_ids"]) == -(-len(text) // 8)
        assert tokens == expected[i]
    # and a request without kv_transfer_params is prefilled by the decode worker itself
    d.generate("local-0", prompts[1], GREEDY)
    assert tokens_of(d.stream("local-0")) == expected[1]


def test_a_second_request_sharing_a_long_prefix_pulls_only_the_blocks_the_decode_worker_lacks(
    workers, clients, reference
):
    prefill, decode = workers
    p, d = clients
    shared = random_prompt(10, 64)  # 8 full blocks of 8 tokens
    first, second = shared + random_prompt(11, 5), shared + random_prompt(12, 20)  # 9 and 11 blocks
    expected = reference([first, second])
    pulled = []
    for rid, text, want in (("prefix-a", first, expected[0]), ("prefix-b", second, expected[1])):
        before = (
            decode.metric("vllm:nixl_num_descriptors_sum"),
            decode.metric("vllm:nixl_num_descriptors_count"),
        )
        hits_before = prefill.metric("vllm:prefix_cache_hits_total")
        tokens, _ = prefill_then_decode(p, d, rid, text, GREEDY)
        assert tokens == want
        wait_until(
            lambda b=before: decode.metric("vllm:nixl_num_descriptors_count") == b[1] + 1, 10, "the record"
        )
        pulled.append(decode.metric("vllm:nixl_num_descriptors_sum") - before[0])
    assert pulled == [9, 3]  # the second pulled its 3 own blocks, not the 8 shared ones
    assert prefill.metric("vllm:prefix_cache_hits_total") - hits_before == 64  # P reused them too


def test_abort_mid_stream_ends_the_stream_with_abort_and_frees_the_blocks(workers, clients):
    _, decode = workers
    _, d = clients
    long = SamplingParams(max_tokens=240, temperature=0.0, ignore_eos=True)
    d.generate("abort-me", random_prompt(20, 8), long)
    for _ in range(3):
        assert isinstance(d.next_for("abort-me"), TokenDelta)
    d.send(Abort(request_id="abort-me"))
    messages = d.stream("abort-me")
    assert messages[-1].finish_reason == "abort"
    assert 3 + sum(len(m.token_ids) for m in messages) < 240
    assert d.receive(0.3) is None  # nothing more for it
    wait_until(lambda: decode.metric("vllm:kv_cache_usage_perc") == 0.0, 10, "the blocks freed")
    assert decode.metric("vllm:request_success_total", finished_reason="abort") >= 1


def test_malformed_frames_are_answered_with_errors_and_the_worker_keeps_serving(workers, clients, reference):
    _, d = clients
    bad_generate = {
        "type": "generate",
        "request_id": "bad-1",
        "prompt_token_ids": "oops",
        "sampling_params": {},
    }
    cases = [
        (b"\xc1 not msgpack", ""),
        (msgpack.packb([1, 2, 3]), ""),
        (msgpack.packb(bad_generate), "bad-1"),
        (msgpack.packb({"type": "bogus", "request_id": "bad-2"}), "bad-2"),
        (encode_message(TokenDelta(request_id="bad-3", token_ids=[1])), "bad-3"),
    ]
    for frame, rid in cases:
        d.send_raw(frame)
        error = d.next_message(lambda m: isinstance(m, ErrorMessage))
        assert (error.request_id, error.code) == (rid, 400), error
    d.send_raw(b"one", b"two")  # two frames where one is expected
    assert d.next_message(lambda m: isinstance(m, ErrorMessage)).code == 400
    # requests the engine refuses, each answered under its id
    refusals = {
        "out-of-vocab": ([5, 100_000], GREEDY, {}),
        "too-long": (random_prompt(30, 250), GREEDY, {}),
        "not-a-producer": (random_prompt(31, 4), GREEDY, {"prefill_only": True}),
        "negative-temperature": (random_prompt(33, 4), SamplingParams(max_tokens=4, temperature=-1.0), {}),
    }
    errors = {}
    for rid, (text, params, extra) in refusals.items():
        d.generate(rid, text, params, **extra)
        errors[rid] = d.next_for(rid)
        assert isinstance(errors[rid], ErrorMessage) and errors[rid].code == 400, errors[rid]
    assert "vocabulary" in errors["out-of-vocab"].message
    assert "max" in errors["too-long"].message and "kv_producer" in errors["not-a-producer"].message
    assert "temperature" in errors["negative-temperature"].message
    d.generate("after-garbage", random_prompt(32, 9), GREEDY)
    assert tokens_of(d.stream("after-garbage")) == reference([random_prompt(32, 9)])[0]


def test_hello_starts_load_reports_with_what_a_router_needs(workers, clients):
    prefill, _ = workers
    p, _ = clients
    p.hello("router-under-test")
    report = p.load_report()
    assert report.worker_id == prefill.info["worker_id"] and report.role == "prefill"
    assert report.engine_id == prefill.info["engine_id"]
    assert report.block_size == 8 and report.prefix_caching_hash_algo == "sha256"
    assert report.num_kv_blocks == 95 and report.max_num_seqs == prefill.info["max_num_seqs"]
    assert prefill.info["model"] == "tiny" and prefill.info["kv_role"] == "kv_producer"
    assert prefill.info["kv_side_channel"]
    # then a heartbeat follows while idle
    assert p.load_report(timeout=3).worker_id == report.worker_id


def _published_by(d: Client, send) -> list[bytes]:
    """The payloads the decode worker publishes while `send()` runs a request to its end."""
    d.hello()
    endpoint = d.load_report().kv_events_endpoint
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    try:
        time.sleep(0.3)  # a SUB misses what is published before it joins
        send()
        payloads = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sub.poll(500):
                topic, seq, payload = sub.recv_multipart()
                assert len(seq) == 8
                payloads.append(payload)
            elif payloads:
                break  # quiet after the request's events
        return payloads
    finally:
        sub.close()


def test_the_decode_worker_publishes_its_kv_events_in_vllms_wire_format(workers, clients):
    _, d = clients
    text = random_prompt(40, 20)

    def send():
        d.generate("events", text, GREEDY)
        tokens_of(d.stream("events"))

    payloads = _published_by(d, send)
    stored = []
    for payload in payloads:
        ts, events, *_ = msgpack.unpackb(payload)  # a plain reader, as the spec says
        stored += [e for e in events if e["type"] == "BlockStored"]
        vllm.decode(payload)  # and vLLM 0.33's own structs take every batch
    assert stored and stored[0]["token_ids"] == text[:16] and stored[0]["block_size"] == 8


def test_the_decode_worker_publishes_the_sha256_cbor_hashes_vllm_computes_for_the_same_tokens(
    workers, clients
):
    _, d = clients
    text = random_prompt(41, 27)

    def send():
        d.send(GenerateRequest(request_id="salted", prompt_token_ids=text, cache_salt="tenant-a",
                               sampling_params=sampling_params_to_wire(GREEDY)))  # fmt: skip
        tokens_of(d.stream("salted"))

    batches = [vllm.decode(payload) for payload in _published_by(d, send)]
    stored = [e for batch in batches for e in batch.events if isinstance(e, vllm.BlockStored)]
    hashes = [h for e in stored for h in e.block_hashes]
    tokens = [t for e in stored for t in e.token_ids]
    assert tokens[:27] == text and len(hashes) >= 3  # the prompt's 3 full blocks, then output blocks
    # vLLM 0.33 without PYTHONHASHSEED: NONE_HASH from "vllm-none-hash", the salt tagged on block 0
    expected = reference_chain(tokens, 8, "vllm-none-hash", cache_salt="tenant-a")
    assert hashes == [int_hash(digest) for digest in expected]
    assert stored[0].parent_block_hash is None
    assert stored[0].extra_keys[0] == ["tenant-a"] and all(k is None for k in stored[0].extra_keys[1:])
    assert all(e.extra_keys is None for e in stored[1:])


def test_an_unpulled_lease_expires_and_frees_the_prefill_workers_blocks(workers, clients):
    prefill, _ = workers
    p, _ = clients
    p.generate("never-pulled", random_prompt(50, 30), GREEDY, prefill_only=True)
    (answer,) = p.stream("never-pulled")
    assert answer.kv_transfer_params is not None
    assert prefill.metric("pdserve:kv_held_requests") == 1 and prefill.metric("vllm:kv_cache_usage_perc") > 0
    wait_until(lambda: prefill.metric("vllm:kv_cache_usage_perc") == 0.0, LEASE_S + 10, "the lease expiry")
    assert prefill.metric("pdserve:kv_held_requests") == 0
    assert prefill.metric("pdserve:kv_lease_expired_requests_total") >= 1


def test_kill_9_of_the_prefill_worker_with_requests_in_flight_recomputes_them_on_the_decode_worker(
    tiny_model, workdir, workers, clients, reference
):
    _, decode = workers
    _, d = clients
    doomed = WorkerProcess(
        "prefill", [*model_flags(tiny_model), *kv_transfer_flag("TcpConnector", "kv_producer")], workdir
    )
    try:
        doomed.ready()
        p = Client(doomed.address)
        prompts = [random_prompt(60 + i, 40 + 9 * i) for i in range(3)]
        answers = []
        for i, text in enumerate(prompts):
            p.generate(f"doomed-{i}", text, GREEDY, prefill_only=True)
            (answer,) = p.stream(f"doomed-{i}")
            answers.append({**answer.kv_transfer_params, "first_token_id": answer.token_ids[0]})
        p.generate("never-answered", random_prompt(70, 100), GREEDY, prefill_only=True)
        failures_before = decode.metric("pdserve:kv_load_failures_total")
        for i in (0, 1):
            d.generate(f"doomed-{i}", prompts[i], GREEDY, kv_transfer_params=answers[i])
        doomed.kill()  # SIGKILL: no goodbye to anyone
        d.generate("doomed-2", prompts[2], GREEDY, kv_transfer_params=answers[2])
        expected = reference(prompts)
        for i in range(3):
            messages = d.stream(f"doomed-{i}", timeout=60)
            assert [answers[i]["first_token_id"], *tokens_of(messages)] == expected[i]
        # the pull from the dead worker failed and was recomputed
        assert decode.metric("pdserve:kv_load_failures_total") > failures_before
        p.close()
    finally:
        doomed.kill()


def test_sigterm_fails_what_is_in_flight_and_exits_cleanly(tiny_model, workdir):
    worker = WorkerProcess(
        "decode", [*model_flags(tiny_model), *kv_transfer_flag("TcpConnector", "kv_consumer")], workdir
    )
    try:
        client = Client(worker.ready().address)
        client.generate(
            "in-flight",
            random_prompt(80, 8),
            SamplingParams(max_tokens=240, temperature=0.0, ignore_eos=True),
        )
        assert isinstance(client.next_for("in-flight"), TokenDelta)
        assert worker.stop() == 0
        last = client.stream("in-flight", timeout=10)[-1]
        assert isinstance(last, ErrorMessage) and last.code == 503 and "shutting down" in last.message
        client.close()
    finally:
        worker.kill()
