"""The scheduler driven step by step by a fake model.

The fake model keeps its own "KV cache" (block id -> offset -> token): each step it
reads a request's context through the block table, writes the new tokens, and picks
the next token from what it read. A wrong block table, a cache hit on the wrong
blocks or a lost token after preemption changes the generated text, so comparing with
a plain sequential reference checks the scheduler and the KV-cache manager together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from common.config.engine_config import EngineConfig
from common.engine.block_pool import NULL_BLOCK_ID, BlockPool
from common.engine.kv_cache_manager import KVCacheManager
from common.engine.outputs import RequestOutput, SampledToken, TokenLogprobs
from common.engine.request import Request, RequestStatus
from common.engine.scheduled_batch import ScheduledBatch
from common.engine.scheduler import Scheduler
from common.sampling_params import SamplingParams

VOCAB = 50


def next_token(history: list[int]) -> int:
    """A deterministic 'model': the next token depends on every token before it."""
    acc = 17
    for t in history:
        acc = (acc * 31 + t + 1) % 1_000_003
    return acc % VOCAB


def reference(
    prompt: list[int], max_tokens: int, model: Callable[[list[int]], int] = next_token
) -> list[int]:
    history = list(prompt)
    for _ in range(max_tokens):
        history.append(model(history))
    return history[len(prompt) :]


class FakeModel:
    def __init__(self, block_size: int, model: Callable[[list[int]], int] = next_token) -> None:
        self.block_size = block_size
        self.model = model
        self.cache: dict[int, dict[int, int]] = {}

    def step(self, batch: ScheduledBatch) -> dict[str, SampledToken]:
        bs = self.block_size
        sampled = {}
        for request, n, table in zip(
            batch.requests, batch.num_scheduled_tokens, batch.block_tables, strict=True
        ):
            start = request.num_computed_tokens
            assert n >= 1 and start + n <= request.num_tokens
            assert len(table) * bs >= start + n and NULL_BLOCK_ID not in table
            context = [self.cache.get(table[p // bs], {}).get(p % bs) for p in range(start)]
            assert None not in context, f"{request.request_id} reads KV that was never written"
            new = request.all_token_ids[start : start + n]
            for p, token in enumerate(new, start):
                self.cache.setdefault(table[p // bs], {})[p % bs] = token
            if start + n == request.num_tokens:
                sampled[request.request_id] = SampledToken(self.model(context + new))
        return sampled


@dataclass
class Run:
    batches: list[list[tuple[str, int, int]]] = field(default_factory=list)  # (id, computed, n)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    finish: dict[str, str | None] = field(default_factory=dict)
    outputs: list[RequestOutput] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)
    running_sizes: list[int] = field(default_factory=list)


def drive(scheduler: Scheduler, fake: FakeModel, max_steps: int = 2000) -> Run:
    run = Run()
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return run
        step(scheduler, fake, run)
    raise AssertionError("the scheduler did not finish its requests")


def step(scheduler: Scheduler, fake: FakeModel, run: Run) -> list[RequestOutput]:
    batch = scheduler.schedule()
    assert batch.total_num_scheduled_tokens <= scheduler.max_num_batched_tokens
    assert len(scheduler.running) <= scheduler.max_num_seqs
    run.running_sizes.append(len(scheduler.running))
    run.batches.append(
        [
            (r.request_id, r.num_computed_tokens, n)
            for r, n in zip(batch.requests, batch.num_scheduled_tokens, strict=True)
        ]
    )
    run.preempted += batch.preempted_request_ids
    run.finished_ids += batch.finished_request_ids
    outputs = scheduler.update_from_output(batch, fake.step(batch))
    for out in outputs:
        run.tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        if out.finished:
            assert out.request_id not in run.finish, "finished twice"
            run.finish[out.request_id] = out.finish_reason
    run.outputs += outputs
    return outputs


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_batched_tokens: int = 16,
    max_num_seqs: int = 8,
    chunked: bool = True,
    threshold: int = 0,
    partial: int = 1,
    policy: str = "fcfs",
    caching: bool = True,
    max_model_len: int = 128,
) -> Scheduler:
    config = EngineConfig(
        block_size=block_size,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        enable_chunked_prefill=chunked,
        long_prefill_token_threshold=threshold,
        max_num_partial_prefills=partial,
        scheduling_policy=policy,
        enable_prefix_caching=caching,
    )
    pool = BlockPool(num_blocks, block_size, enable_caching=caching)
    return Scheduler(config, KVCacheManager(pool, block_size, enable_caching=caching), max_model_len)


def request(
    rid: str, prompt: list[int], max_tokens: int = 6, priority: int = 0, arrival: float = 0.0, **params
) -> Request:
    eos = params.pop("eos", None)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, **params)
    return Request(rid, prompt, sp, eos_token_id=eos, priority=priority, arrival_time=arrival)


def prompt_of(n: int, seed: int) -> list[int]:
    return [(seed * 7 + i * 3) % VOCAB for i in range(n)]


def assert_pool_empty(scheduler: Scheduler) -> None:
    pool = scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_usable_blocks
    assert all(b.ref_cnt == 0 for b in pool.blocks)


# ---------------------------------------------------------------------------
# batching


def test_chunked_prefill_mixes_several_prompts_and_decodes_in_a_budget_of_16():
    sched = make_scheduler(max_num_batched_tokens=16, partial=2)
    prompts = {"a": prompt_of(5, 1), "b": prompt_of(30, 2), "c": prompt_of(3, 3), "d": prompt_of(12, 4)}
    for i, (rid, p) in enumerate(prompts.items()):
        sched.add_request(request(rid, p, max_tokens=6, arrival=i))
    run = drive(sched, FakeModel(4))
    assert run.tokens == {rid: reference(p, 6) for rid, p in prompts.items()}
    assert all(reason == "length" for reason in run.finish.values())
    assert max(sum(n for *_, n in b) for b in run.batches) == 16
    # b's 30-token prompt is split over several steps
    assert len([1 for b in run.batches for rid, c, n in b if rid == "b" and c + n <= 30]) >= 2

    # some step runs a decode next to a prompt chunk, and some step runs chunks of two prompts
    def is_prompt_chunk(rid, computed, n):
        return computed < len(prompts[rid])

    assert any(
        any(not is_prompt_chunk(*e) for e in b) and any(is_prompt_chunk(*e) for e in b) for b in run.batches
    )
    assert any(sum(is_prompt_chunk(*e) for e in b) >= 2 for b in run.batches)
    assert_pool_empty(sched)


def test_decodes_are_packed_before_unfinished_prompts():
    sched = make_scheduler(max_num_batched_tokens=8, threshold=4, partial=2)
    prompts = {"long": prompt_of(40, 2), "short": prompt_of(3, 1)}
    sched.add_request(request("long", prompts["long"], max_tokens=2, arrival=0))
    sched.add_request(request("short", prompts["short"], max_tokens=4, arrival=1))
    run = drive(sched, FakeModel(4))
    mixed = 0
    for b in run.batches:
        kinds = ["prompt" if c + n < len(prompts[rid]) + 1 and n > 1 else "decode" for rid, c, n in b]
        assert kinds == sorted(kinds)  # "decode" < "prompt"
        mixed += kinds == ["decode", "prompt"]
    assert mixed >= 2
    assert run.tokens == {rid: reference(p, 2 if rid == "long" else 4) for rid, p in prompts.items()}


def test_max_num_seqs_caps_the_running_requests():
    sched = make_scheduler(max_num_seqs=2)
    prompts = {f"r{i}": prompt_of(5 + i, i) for i in range(5)}
    for i, (rid, p) in enumerate(prompts.items()):
        sched.add_request(request(rid, p, max_tokens=4, arrival=i))
    run = drive(sched, FakeModel(4))
    assert max(run.running_sizes) == 2 and max(len(b) for b in run.batches) == 2
    assert run.tokens == {rid: reference(p, 4) for rid, p in prompts.items()}


def test_without_chunked_prefill_a_prompt_runs_whole():
    sched = make_scheduler(max_num_batched_tokens=32, chunked=False, max_model_len=32)
    sched.add_request(request("a", prompt_of(20, 1), max_tokens=3, arrival=0))
    sched.add_request(request("b", prompt_of(20, 2), max_tokens=3, arrival=1))
    run = drive(sched, FakeModel(4))
    assert run.batches[0] == [("a", 0, 20)]  # b does not fit the rest of the budget
    assert ("b", 0, 20) in run.batches[1]
    assert all(n in (1, 20) for b in run.batches for *_, n in b)
    assert run.tokens["b"] == reference(prompt_of(20, 2), 3)


def test_long_prefill_token_threshold_caps_a_prompts_chunk():
    sched = make_scheduler(max_num_batched_tokens=16, threshold=5)
    sched.add_request(request("a", prompt_of(12, 1), max_tokens=2))
    run = drive(sched, FakeModel(4))
    assert [n for b in run.batches for rid, c, n in b if c < 12] == [5, 5, 2]
    assert run.tokens["a"] == reference(prompt_of(12, 1), 2)


@pytest.mark.parametrize("partial", [1, 2])
def test_max_num_partial_prefills_limits_prompts_in_flight(partial):
    sched = make_scheduler(max_num_batched_tokens=16, threshold=6, partial=partial)
    prompts = {rid: prompt_of(20, i) for i, rid in enumerate("abc")}
    for i, (rid, p) in enumerate(prompts.items()):
        sched.add_request(request(rid, p, max_tokens=2, arrival=i))
    run = drive(sched, FakeModel(4))
    most = 0
    for b in run.batches:  # prompts left unfinished after this step
        most = max(most, sum(1 for rid, c, n in b if c + n < len(prompts[rid])))
    assert most == partial
    assert run.tokens == {rid: reference(p, 2) for rid, p in prompts.items()}


# ---------------------------------------------------------------------------
# preemption


def _preemption_workload() -> dict[str, list[int]]:
    return {f"r{i}": prompt_of(6 + 3 * i, i) for i in range(5)}


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_by_recompute_gives_the_same_tokens_as_plenty_of_blocks(caching):
    results = {}
    for num_blocks in (200, 12):
        sched = make_scheduler(
            num_blocks=num_blocks, caching=caching, max_num_seqs=5, max_num_batched_tokens=16
        )
        for i, (rid, p) in enumerate(_preemption_workload().items()):
            sched.add_request(request(rid, p, max_tokens=14, arrival=i))
        run = drive(sched, FakeModel(4))
        results[num_blocks] = (run, sched)
        assert_pool_empty(sched)
    plenty, few = results[200][0], results[12][0]
    assert plenty.preempted == [] and results[200][1].num_preemptions == 0
    assert few.preempted and results[12][1].num_preemptions == len(few.preempted)
    assert few.tokens == plenty.tokens == {rid: reference(p, 14) for rid, p in _preemption_workload().items()}
    assert set(few.finish.values()) == {"length"}


def test_the_latest_arrival_is_preempted_and_recomputed_first_in_line():
    sched = make_scheduler(num_blocks=7, max_num_seqs=3)  # 6 usable blocks of 4
    for i in range(3):
        sched.add_request(request(f"r{i}", prompt_of(7, i), max_tokens=8, arrival=i))
    fake, run = FakeModel(4), Run()
    while not run.preempted:
        step(sched, fake, run)
    assert run.preempted == ["r2"]
    preempted = sched.requests["r2"]
    assert preempted.status == RequestStatus.PREEMPTED and preempted.num_computed_tokens == 0
    assert sched.waiting[0] is preempted and sched.kv.get_block_ids("r2") == []
    rest = drive(sched, fake)
    assert {**run.tokens, **{k: run.tokens.get(k, []) + v for k, v in rest.tokens.items()}} == {
        f"r{i}": reference(prompt_of(7, i), 8) for i in range(3)
    }


def test_under_priority_the_lowest_priority_running_request_is_preempted():
    sched = make_scheduler(num_blocks=7, max_num_seqs=3, policy="priority")
    for i, prio in enumerate([0, 5, 1]):  # r1 has the lowest priority though r2 arrived later
        sched.add_request(request(f"r{i}", prompt_of(7, i), max_tokens=8, priority=prio, arrival=i))
    fake, run = FakeModel(4), Run()
    while not run.preempted:
        step(sched, fake, run)
    assert run.preempted == ["r1"]


def test_a_request_longer_than_the_whole_cache_is_aborted_not_waited_for():
    sched = make_scheduler(num_blocks=4)  # 3 usable blocks: 12 tokens at most
    sched.add_request(request("huge", prompt_of(20, 1), max_tokens=2, arrival=0))
    sched.add_request(request("small", prompt_of(5, 2), max_tokens=2, arrival=1))
    run = drive(sched, FakeModel(4))
    assert run.finish == {"huge": "abort", "small": "length"}
    assert run.tokens["huge"] == [] and run.tokens["small"] == reference(prompt_of(5, 2), 2)
    assert_pool_empty(sched)


def test_a_request_that_outgrows_the_whole_cache_is_aborted_with_its_tokens_so_far():
    sched = make_scheduler(num_blocks=3)  # 8 tokens at most
    sched.add_request(request("grows", prompt_of(5, 1), max_tokens=20))
    run = drive(sched, FakeModel(4))
    assert run.finish == {"grows": "abort"}
    assert run.tokens["grows"] == reference(prompt_of(5, 1), 4)  # 5 + 4 tokens: the 9th cannot be computed
    assert_pool_empty(sched)


# ---------------------------------------------------------------------------
# order


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_admission_order_follows_the_policy(policy):
    sched = make_scheduler(max_num_seqs=1, policy=policy)
    for rid, prio, arrival in [("a", 3, 0.0), ("b", 1, 1.0), ("c", 2, 2.0), ("d", 1, 3.0)]:
        sched.add_request(request(rid, prompt_of(4, ord(rid)), max_tokens=2, priority=prio, arrival=arrival))
    run = drive(sched, FakeModel(4))
    first_seen = list(dict.fromkeys(rid for b in run.batches for rid, *_ in b))
    assert first_seen == (["a", "b", "c", "d"] if policy == "fcfs" else ["b", "d", "c", "a"])


# ---------------------------------------------------------------------------
# prefix caching


@pytest.mark.parametrize("caching", [True, False])
def test_a_prefix_cache_hit_shrinks_the_scheduled_prompt(caching):
    sched = make_scheduler(caching=caching)
    shared = prompt_of(16, 9)
    sched.add_request(request("first", shared + [1, 2, 3, 4], max_tokens=3))
    fake = FakeModel(4)
    drive(sched, fake)
    second = shared + [5, 6, 7, 8]
    sched.add_request(request("second", second, max_tokens=3))
    run = drive(sched, fake)
    first_step = run.batches[0]
    if caching:
        assert first_step == [("second", 16, 4)]
        assert run.outputs[-1].num_cached_tokens == 16
        assert sched.prefix_cache_hits == 16 and sched.prefix_cache_queries == 40
    else:
        assert first_step[0] == ("second", 0, 16)
        assert run.outputs[-1].num_cached_tokens == 0
    assert run.tokens["second"] == reference(second, 3)


def test_a_follow_up_turn_hits_the_previous_prompt_and_its_generated_tokens():
    sched = make_scheduler()
    fake = FakeModel(4)
    first_prompt = prompt_of(10, 3)
    sched.add_request(request("turn1", first_prompt, max_tokens=7))
    answer = drive(sched, fake).tokens["turn1"]
    follow_up = first_prompt + answer + [9, 9, 9]  # 20 tokens; 16 of them were computed
    sched.add_request(request("turn2", follow_up, max_tokens=3))
    run = drive(sched, fake)
    assert run.batches[0] == [("turn2", 16, 4)]
    assert run.tokens["turn2"] == reference(follow_up, 3)


# ---------------------------------------------------------------------------
# aborts


def test_abort_frees_blocks_and_is_reported_to_the_runner():
    sched = make_scheduler()
    sched.add_request(request("a", prompt_of(9, 1), max_tokens=10, arrival=0))
    sched.add_request(request("b", prompt_of(9, 2), max_tokens=4, arrival=1))
    sched.add_request(request("queued", prompt_of(9, 3), max_tokens=4, arrival=2))
    fake, run = FakeModel(4), Run()
    step(sched, fake, run)
    step(sched, fake, run)
    free_before = sched.kv.pool.num_free_blocks
    held = len(sched.kv.get_block_ids("a"))
    (out,) = sched.abort_requests(["a", "unknown"])
    assert (out.request_id, out.finished, out.finish_reason, out.new_token_ids) == ("a", True, "abort", [])
    assert sched.kv.get_block_ids("a") == [] and sched.kv.pool.num_free_blocks == free_before + held
    assert sched.abort_requests(["a"]) == []
    next_batch = sched.schedule()
    assert next_batch.finished_request_ids == ["a"]
    assert "a" not in [r.request_id for r in next_batch.requests]
    sched.update_from_output(next_batch, fake.step(next_batch))
    rest = drive(sched, fake)
    assert rest.finish == {"b": "length", "queued": "length"}
    assert_pool_empty(sched)


def test_a_request_aborted_while_its_step_runs_is_left_alone_by_the_update():
    sched = make_scheduler()
    sched.add_request(request("a", prompt_of(5, 1)))
    fake = FakeModel(4)
    batch = sched.schedule()
    sampled = fake.step(batch)
    sched.abort_requests(["a"])
    assert sched.update_from_output(batch, sampled) == []
    assert not sched.has_unfinished_requests()
    assert_pool_empty(sched)


# ---------------------------------------------------------------------------
# stopping

SCRIPT = [11, 12, 2, 13, 14, 15, 16, 17]  # token 2 plays EOS


def scripted(prompt_len: int) -> Callable[[list[int]], int]:
    return lambda history: SCRIPT[len(history) - prompt_len]


def _generate(
    max_tokens: int = 8, max_model_len: int = 128, **params
) -> tuple[list[int], str | None, int | None]:
    sched = make_scheduler(max_model_len=max_model_len)
    prompt = prompt_of(5, 1)
    sched.add_request(request("r", prompt, max_tokens=max_tokens, **params))
    run = drive(sched, FakeModel(4, scripted(len(prompt))))
    last = run.outputs[-1]
    assert last.finished and last.request_id == "r"
    return run.tokens["r"], last.finish_reason, last.stop_reason


def test_eos_stops_the_request():
    assert _generate(eos=2) == ([11, 12, 2], "stop", None)


def test_ignore_eos_runs_to_max_tokens():
    assert _generate(eos=2, ignore_eos=True) == (SCRIPT, "length", None)


def test_a_stop_token_id_stops_and_is_reported():
    assert _generate(stop_token_ids=[13, 99]) == ([11, 12, 2, 13], "stop", 13)


def test_max_tokens_ends_with_length():
    assert _generate(max_tokens=2, eos=2) == ([11, 12], "length", None)


def test_no_stop_before_min_tokens():
    assert _generate(eos=2, min_tokens=4) == (SCRIPT, "length", None)
    assert _generate(stop_token_ids=[12, 15], min_tokens=3) == ([11, 12, 2, 13, 14, 15], "stop", 15)


def test_a_stop_token_on_the_last_allowed_token_reads_stop():
    assert _generate(max_tokens=3, eos=2) == ([11, 12, 2], "stop", None)


def test_max_model_len_ends_with_length():
    assert _generate(max_model_len=8) == ([11, 12, 2], "length", None)  # 5 prompt + 3


def test_logprobs_are_passed_through():
    sched = make_scheduler()
    sched.add_request(request("r", [1, 2, 3], max_tokens=1))
    batch = sched.schedule()
    lp = TokenLogprobs(token_id=7, logprob=-0.5, rank=1, top=[(7, -0.5)])
    (out,) = sched.update_from_output(batch, {"r": SampledToken(7, lp)})
    assert out.new_token_ids == [7] and out.new_logprobs == [lp] and out.finish_reason == "length"
    assert out.num_prompt_tokens == 3


def test_a_missing_sampled_token_is_a_clear_error():
    sched = make_scheduler()
    sched.add_request(request("r", [1, 2, 3]))
    batch = sched.schedule()
    with pytest.raises(RuntimeError, match="no sampled token"):
        sched.update_from_output(batch, {})


# ---------------------------------------------------------------------------
# validation


def test_unresolved_or_inconsistent_config_is_refused():
    kv = KVCacheManager(BlockPool(8, 16), 16)
    with pytest.raises(ValueError, match="max_num_batched_tokens, max_num_seqs"):
        Scheduler(EngineConfig(block_size=16), kv, 128)
    resolved = dict(block_size=16, max_num_batched_tokens=64, max_num_seqs=8, enable_chunked_prefill=True)
    with pytest.raises(ValueError, match="at least --max-num-seqs"):
        Scheduler(EngineConfig(**{**resolved, "max_num_seqs": 128}), kv, 128)
    with pytest.raises(ValueError, match="--enable-chunked-prefill"):
        Scheduler(EngineConfig(**{**resolved, "enable_chunked_prefill": False}), kv, 128)
    with pytest.raises(ValueError, match="fcfs, priority"):
        Scheduler(EngineConfig(**{**resolved, "scheduling_policy": "lifo"}), kv, 128)
    with pytest.raises(ValueError, match="block size"):
        Scheduler(EngineConfig(**{**resolved, "block_size": 32}), kv, 128)


def test_bad_requests_are_refused_at_add():
    sched = make_scheduler(max_model_len=10)
    sched.add_request(request("a", [1, 2]))
    with pytest.raises(ValueError, match="already"):
        sched.add_request(request("a", [1, 2]))
    with pytest.raises(ValueError, match="empty"):
        sched.add_request(request("b", []))
    with pytest.raises(ValueError, match="more than --max-model-len 10"):
        sched.add_request(request("c", list(range(11))))
    assert sched.num_waiting == 1 and sched.num_running == 0
