"""The scheduler's disaggregation states, driven by the fake model of test_scheduler.py.

A producer scheduler runs prefill_only requests and holds their blocks; a consumer
scheduler admits requests whose prompt KV is remote, and the test plays the connector
and the role: it copies the producer's fake cache entries of the ordered remote blocks
into the consumer's local blocks, and picks what follows a failed pull. A wrong block pairing, a pull that is skipped or a block read
before it landed changes the text (or trips the fake model's never-written check).
"""

from __future__ import annotations

from test_scheduler import (
    FakeModel,
    Run,
    assert_pool_empty,
    make_scheduler,
    prompt_of,
    reference,
    request,
    step,
)

from common.config.engine_config import EngineConfig
from common.config.kv_transfer_config import KVTransferConfig
from common.engine.block_pool import BlockPool
from common.engine.kv_cache_manager import KVCacheManager
from common.engine.remote_kv_states import KVPull
from common.engine.request import Request, RequestStatus
from common.engine.scheduler import Scheduler

BS = 4


def consumer_scheduler(num_blocks: int = 64, max_num_seqs: int = 8) -> Scheduler:
    config = EngineConfig(
        block_size=BS,
        max_num_batched_tokens=16,
        max_num_seqs=max_num_seqs,
        enable_chunked_prefill=True,
        kv_transfer_config=KVTransferConfig(kv_connector="TcpConnector", kv_role="kv_consumer"),
    )
    return Scheduler(config, KVCacheManager(BlockPool(num_blocks, BS), BS), 128)


class Producer:
    """A producer scheduler and its fake model: prefill_only requests, held blocks."""

    def __init__(self) -> None:
        self.sched = make_scheduler(block_size=BS)
        self.fake = FakeModel(BS)
        self.run = Run()

    def prefill(self, rid: str, prompt: list[int], max_tokens: int = 6) -> dict:
        """Run the request to its first token; the params a connector would export."""
        self.sched.add_request(prefill_only(request(rid, prompt, max_tokens=max_tokens)))
        while rid not in self.run.finish:
            step(self.sched, self.fake, self.run)
        first = self.run.tokens[rid]
        assert len(first) == 1 and self.run.finish[rid] is None
        return {
            "remote_block_ids": self.sched.kv.get_block_ids(rid),
            "remote_num_tokens": len(prompt),
            "first_token_id": first[0],
        }


def prefill_only(r: Request) -> Request:
    r.prefill_only = True
    return r


def remote_request(rid: str, prompt: list[int], params: dict, max_tokens: int = 6) -> Request:
    """A request whose prompt's KV is at the producer `params` name, holding its first token."""
    r = request(rid, prompt, max_tokens=max_tokens)
    r.kv_transfer_params = params
    r.append_output_token(params["first_token_id"])
    return r


def land(pull: KVPull, producer: Producer, consumer_fake: FakeModel) -> None:
    """What a connector's pull does: the remote blocks' contents into the local blocks."""
    for local, remote in zip(pull.local_block_ids, pull.remote_block_ids, strict=True):
        consumer_fake.cache[local] = dict(producer.fake.cache[remote])


def test_a_prefill_only_request_holds_its_blocks_after_its_first_token_until_freed():
    producer = Producer()
    prompt = prompt_of(10, 1)
    params = producer.prefill("a", prompt)
    sched = producer.sched
    out = next(o for o in producer.run.outputs if o.request_id == "a")
    assert out.finished and out.finish_reason is None and out.new_token_ids == [reference(prompt, 1)[0]]
    assert sched.held_request("a").status == RequestStatus.FINISHED_REMOTE_DECODE
    assert len(params["remote_block_ids"]) == 3  # 10 tokens in blocks of 4
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_usable_blocks - 3
    assert not sched.has_unfinished_requests() and sched.has_kv_transfers()
    # the next steps schedule nothing for it and keep its blocks
    step(sched, producer.fake, producer.run)
    assert sched.kv.get_block_ids("a") == params["remote_block_ids"]
    assert sched.free_held("a") and not sched.free_held("a")
    assert_pool_empty(sched)


def test_a_prefill_only_request_whose_first_token_ends_it_frees_its_blocks():
    producer = Producer()
    producer.sched.add_request(prefill_only(request("one", prompt_of(9, 2), max_tokens=1)))
    while "one" not in producer.run.finish:
        step(producer.sched, producer.fake, producer.run)
    assert producer.run.finish["one"] == "length"
    assert producer.sched.num_held == 0
    assert_pool_empty(producer.sched)


def test_remote_kv_request_pulls_its_prompt_then_decodes_the_aggregated_tokens():
    producer = Producer()
    prompt = prompt_of(11, 3)
    params = producer.prefill("r", prompt, max_tokens=6)
    sched, fake, run = consumer_scheduler(), FakeModel(BS), Run()
    sched.add_request(remote_request("r", prompt, params))
    step(sched, fake, run)
    pulls, releases = sched.take_kv_transfer_orders()
    assert releases == [] and len(pulls) == 1
    pull = pulls[0]
    assert pull.remote_block_ids == params["remote_block_ids"]
    assert pull.local_block_ids == sched.kv.get_block_ids("r")
    assert sched.requests["r"].status == RequestStatus.WAITING_FOR_REMOTE_KV
    # until the pull lands the request is never scheduled
    for _ in range(3):
        step(sched, fake, run)
    assert all(not batch for batch in run.batches)
    land(pull, producer, fake)
    sched.finish_kv_pull("r")
    while sched.has_unfinished_requests():
        step(sched, fake, run)
    # the first decode step computes only the first token's KV
    assert [b for b in run.batches if b][0] == [("r", len(prompt), 1)]
    assert run.tokens["r"] == reference(prompt, 6)[1:]  # max_tokens counts the producer's token
    assert run.finish["r"] == "length"
    assert_pool_empty(sched)
    assert producer.sched.free_held("r")
    assert_pool_empty(producer.sched)


def test_running_requests_keep_decoding_while_a_pull_is_in_flight():
    producer = Producer()
    prompt = prompt_of(14, 4)
    params = producer.prefill("remote", prompt)
    sched, fake, run = consumer_scheduler(), FakeModel(BS), Run()
    local_prompt = prompt_of(5, 9)
    sched.add_request(request("local", local_prompt, max_tokens=8))
    step(sched, fake, run)
    sched.add_request(remote_request("remote", prompt, params))
    step(sched, fake, run)
    (pull,), _ = sched.take_kv_transfer_orders()
    before = len(run.tokens["local"])
    for _ in range(3):
        step(sched, fake, run)
    assert len(run.tokens["local"]) == before + 3
    assert sched.num_waiting_for_remote_kv == 1 and sched.num_running == 1
    land(pull, producer, fake)
    sched.finish_kv_pull("remote")
    while sched.has_unfinished_requests():
        step(sched, fake, run)
    assert run.tokens["local"] == reference(local_prompt, 8)
    assert run.tokens["remote"] == reference(prompt, 6)[1:]
    assert_pool_empty(sched)


def test_a_second_request_pulls_only_the_blocks_its_own_prefix_cache_lacks():
    producer = Producer()
    shared = prompt_of(12, 5)  # three full blocks
    first, second = shared + prompt_of(3, 6), shared + prompt_of(6, 7)
    sched, fake, run = consumer_scheduler(), FakeModel(BS), Run()
    # "first" finds nothing at home; "second" (18 tokens, 5 blocks) finds the 3 shared blocks
    for rid, prompt, num_hits in (("first", first, 0), ("second", second, 3)):
        params = producer.prefill(rid, prompt)
        sched.add_request(remote_request(rid, prompt, params))
        step(sched, fake, run)
        (pull,), _ = sched.take_kv_transfer_orders()
        land(pull, producer, fake)
        sched.finish_kv_pull(rid)
        while rid not in run.finish:
            step(sched, fake, run)
        assert run.tokens[rid] == reference(prompt, 6)[1:]
        assert pull.remote_block_ids == params["remote_block_ids"][num_hits:]
        assert pull.local_block_ids == sched.kv.get_block_ids(rid)[num_hits:] or rid not in sched.requests
    assert sched.num_kv_load_failures == 0


def test_a_full_local_hit_releases_the_producer_without_pulling():
    producer = Producer()
    prompt = prompt_of(8, 8)  # exactly two blocks
    sched, fake, run = consumer_scheduler(), FakeModel(BS), Run()
    # the consumer computed the same prompt itself before
    sched.add_request(request("local", prompt, max_tokens=1))
    while "local" not in run.finish:
        step(sched, fake, run)
    params = producer.prefill("again", prompt)
    sched.add_request(remote_request("again", prompt, params))
    step(sched, fake, run)
    pulls, releases = sched.take_kv_transfer_orders()
    assert pulls == [] and [r.request_id for r in releases] == ["again"]
    while sched.has_unfinished_requests():
        step(sched, fake, run)
    assert run.tokens["again"] == reference(prompt, 6)[1:]
    assert_pool_empty(sched)


def test_a_failed_pull_requeued_is_recomputed_from_the_local_hits():
    producer = Producer()
    prompt = prompt_of(13, 10)
    params = producer.prefill("r", prompt)
    sched, fake, run = consumer_scheduler(), FakeModel(BS), Run()
    sched.add_request(remote_request("r", prompt, params))
    step(sched, fake, run)
    (pull,), _ = sched.take_kv_transfer_orders()
    sched.requeue_failed_pull("r")
    while sched.has_unfinished_requests():
        step(sched, fake, run)
    # the whole prompt plus the producer's first token is computed here
    assert (
        sum(n for b in run.batches for rid, c, n in b if rid == "r" and c <= len(prompt)) == len(prompt) + 1
    )
    assert run.tokens["r"] == reference(prompt, 6)[1:]
    assert sched.num_kv_load_failures == 1
    assert_pool_empty(sched)


def test_a_failed_pull_failed_finishes_the_request_with_the_error_at_the_next_step():
    producer = Producer()
    prompt = prompt_of(9, 11)
    params = producer.prefill("r", prompt)
    sched, fake, run = consumer_scheduler(), FakeModel(BS), Run()
    sched.add_request(remote_request("r", prompt, params))
    step(sched, fake, run)
    sched.take_kv_transfer_orders()
    sched.fail_pull("r", "loading failed: handshake refused")
    assert sched.num_kv_load_failures == 1 and "r" not in sched.requests
    assert_pool_empty(sched)
    (output,) = step(sched, fake, run)
    assert output.finished and output.finish_reason == "abort"
    assert output.error == "loading failed: handshake refused"
    assert not sched.has_unfinished_requests()


def test_params_that_do_not_fit_the_prompt_order_a_failed_pull_that_can_be_recomputed():
    sched, fake, run = consumer_scheduler(), FakeModel(BS), Run()
    prompt = prompt_of(10, 12)
    first = reference(prompt, 1)[0]
    params = {"remote_block_ids": [5, 6], "first_token_id": first}  # 10 tokens need 3 blocks
    sched.add_request(remote_request("r", prompt, params))
    step(sched, fake, run)
    (pull,), releases = sched.take_kv_transfer_orders()
    assert releases == [] and pull.request_id == "r" and pull.params == params
    assert "2 remote blocks" in pull.error and pull.remote_block_ids == []
    sched.requeue_failed_pull("r")  # what the consumer's policy "recompute" picks
    while sched.has_unfinished_requests():
        step(sched, fake, run)
    assert run.tokens["r"] == reference(prompt, 6)[1:]


def test_an_abort_during_a_pull_keeps_the_blocks_until_the_pull_ends():
    producer = Producer()
    prompt = prompt_of(10, 13)
    params = producer.prefill("r", prompt)
    sched, fake, run = consumer_scheduler(), FakeModel(BS), Run()
    sched.add_request(remote_request("r", prompt, params))
    step(sched, fake, run)
    sched.take_kv_transfer_orders()
    (out,) = sched.abort_requests(["r"])
    assert out.finished and out.finish_reason == "abort"
    assert not sched.has_unfinished_requests()
    # the transfer may still write into the blocks: they are not free yet
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_usable_blocks - 3
    assert sched.take_kv_transfer_orders() == ([], [])  # the pull itself tells the producer
    sched.finish_kv_pull("r")
    assert_pool_empty(sched)


def test_an_abort_before_admission_releases_the_producer():
    sched, fake, run = consumer_scheduler(max_num_seqs=1), FakeModel(BS), Run()
    sched.add_request(request("busy", prompt_of(4, 1), max_tokens=20))
    step(sched, fake, run)
    params = {"remote_block_ids": [1, 2], "first_token_id": 3}
    sched.add_request(remote_request("r", prompt_of(6, 2), params))
    step(sched, fake, run)  # no seat: still waiting
    assert sched.take_kv_transfer_orders() == ([], [])
    sched.abort_requests(["r"])
    pulls, releases = sched.take_kv_transfer_orders()
    assert pulls == [] and releases[0].request_id == "r" and releases[0].params == params


def test_a_first_token_that_already_ends_the_request_releases_the_producer_at_once():
    sched, fake, run = consumer_scheduler(), FakeModel(BS), Run()
    params = {"remote_block_ids": [1, 2], "first_token_id": 7}
    sched.add_request(remote_request("r", prompt_of(6, 2), params, max_tokens=1))
    _, releases = sched.take_kv_transfer_orders()
    assert [r.request_id for r in releases] == ["r"]
    step(sched, fake, run)
    assert run.finish == {"r": "length"} and run.tokens["r"] == []


def test_pulling_requests_take_seats_and_are_never_preempted():
    producer = Producer()
    prompt = prompt_of(12, 14)
    params = producer.prefill("r", prompt)
    sched, fake, run = consumer_scheduler(num_blocks=9, max_num_seqs=2), FakeModel(BS), Run()
    sched.add_request(remote_request("r", prompt, params))
    step(sched, fake, run)
    (pull,), _ = sched.take_kv_transfer_orders()
    # a local request that needs more blocks than are left: it must preempt itself, never "r"
    sched.add_request(request("hungry", prompt_of(4, 3), max_tokens=20))
    sched.add_request(request("third", prompt_of(4, 4), max_tokens=2))
    for _ in range(40):
        step(sched, fake, run)
        if run.preempted:
            break
    assert run.preempted == ["hungry"]
    assert "r" not in run.preempted and sched.requests["r"].status == RequestStatus.WAITING_FOR_REMOTE_KV
    assert sched.kv.get_block_ids("r") == pull.local_block_ids
    assert "third" not in run.tokens  # two seats: "r" and "hungry"
    land(pull, producer, fake)
    sched.finish_kv_pull("r")
    while sched.has_unfinished_requests():
        step(sched, fake, run)
    assert run.tokens["r"] == reference(prompt, 6)[1:]
    assert run.tokens["hungry"] == reference(prompt_of(4, 3), 20)
    assert_pool_empty(sched)
