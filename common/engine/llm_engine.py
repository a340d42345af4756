"""The engine loop: requests in, tokens out, one scheduled step at a time.

An LLMEngine wires the parts together: the scheduler decides who runs this step
(with the KV-cache manager and block pool behind it), the model runner packs the step,
runs the model and samples, and the scheduler turns the sampled tokens into outputs.
It also resolves the settings EngineConfig leaves to the model and the device
(`resolve_engine_config`) and the model's generation-config defaults.

For disaggregation a worker attaches a KV-transfer connector (`attach_kv_connector`);
the engine then drives it from its own thread, inside `step()` (or
`process_kv_transfers()` while it has nothing to run): a `prefill_only` request's
blocks are exported after its first token and freed when the connector says so; a
request added with `kv_transfer_params` pulls the prompt blocks it lacks, and the
connector's poll() lets it join the batch (see scheduler.py and
docs/disaggregation-flow.md).

With --tensor-parallel-size N > 1 the engine's process is rank 0 of N
(common/distributed/): it spawns ranks 1..N-1, each loading its shard of the weights,
and every step its model runner hands them the step's inputs; all ranks run the same
forward, only rank 0 samples. shutdown() (or the engine being collected) stops them.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from common.attention.backend_select import get_attention_backend
from common.config.engine_config import EngineConfig
from common.distributed.shard_plan import plan_shards
from common.engine.block_pool import BlockPool
from common.engine.kv_cache_manager import KVCacheManager
from common.engine.kv_cache_sizing import determine_num_blocks
from common.engine.model_runner import (
    ModelRunner,
    StepHandle,
    cache_model_config,
    profile_forward,
    resolve_kv_cache_dtype,
)
from common.engine.outputs import RequestOutput, SampledToken
from common.engine.request import Request
from common.engine.sampler import can_sample_ahead
from common.engine.scheduled_batch import ScheduledBatch
from common.engine.scheduler import Scheduler
from common.generation_config import read_generation_config, sampling_defaults
from common.kv_events import KVEvent
from common.model_files import resolve_model
from common.sampling_params import SamplingParams

DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_NUM_SEQS = 256
# Token budget per step with chunked prefill. vLLM's default is 2048 for serving (8192
# and up on large GPUs); a CPU step of 2048 tokens already takes seconds, so more would
# only delay the running decodes, while a GPU forward of 8192 tokens keeps it busy.
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cpu": 2048, "cuda": 8192}
# Without chunked prefill a whole prompt must fit in one step.
MIN_UNCHUNKED_BATCHED_TOKENS = 2048

@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of usable blocks held by requests
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found there
    num_preemptions: int
    num_prompt_tokens: int  # tokens computed for prompts (and recomputed after preemption)
    num_generation_tokens: int  # tokens sampled
    num_steps: int
    num_waiting_for_remote_kv: int = 0  # admitted, their prompt's KV being pulled
    num_held_requests: int = 0  # finished prefill_only requests whose blocks a consumer may pull
    num_queued_prefill_tokens: int = 0  # prompt tokens accepted and not computed yet
    num_kv_load_failures: int = 0  # pulls that failed (recomputed or failed by the policy)


class KVConnectorLike(Protocol):
    """What the engine calls on a KV-transfer connector (kvtransfer.connector.KVConnector)."""

    is_producer: bool
    is_consumer: bool

    def register_kv_cache(self, kv_cache: torch.Tensor) -> None: ...
    def export_blocks(self, request_id: str, block_ids: list[int], num_tokens: int) -> dict[str, Any]: ...
    def take_freed_requests(self) -> list[str]: ...
    def start_pull(
        self, request_id: str, params: dict[str, Any], local_block_ids: list[int], remote_block_ids: list[int]
    ) -> None: ...
    def poll(self) -> tuple[list[str], list[tuple[str, str]]]: ...
    def notify_done(self, request_id: str, params: dict[str, Any]) -> None: ...


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
    return torch.device(device)


def resolve_engine_config(config: EngineConfig, model_config, device: torch.device) -> EngineConfig:
    """A copy of `config` with every None filled from the model and the device, and checked."""
    plan_shards(model_config, config.tensor_parallel_size)  # ValueError when the model does not split so
    model_len = model_config.max_position_embeddings
    max_model_len = config.max_model_len if config.max_model_len is not None else model_len
    if max_model_len < 1:
        raise ValueError(f"--max-model-len must be at least 1, got {max_model_len}")
    if max_model_len > model_len:
        raise ValueError(
            f"--max-model-len {max_model_len} is larger than the model's context length {model_len} "
            "(max_position_embeddings); lower --max-model-len"
        )
    chunked = True if config.enable_chunked_prefill is None else config.enable_chunked_prefill
    max_batched = config.max_num_batched_tokens
    if max_batched is None:
        if chunked:
            max_batched = DEFAULT_MAX_NUM_BATCHED_TOKENS.get(device.type, 2048)
        else:
            max_batched = max(max_model_len, MIN_UNCHUNKED_BATCHED_TOKENS)
    if max_batched < 1:
        raise ValueError(f"--max-num-batched-tokens must be at least 1, got {max_batched}")
    max_num_seqs = config.max_num_seqs
    if max_num_seqs is None:
        # every running sequence needs a token of the step's budget: a small budget given
        # alone (--max-num-batched-tokens 16) lowers the default rather than failing
        max_num_seqs = min(DEFAULT_MAX_NUM_SEQS, max_batched)
    return dataclasses.replace(
        config,
        device=str(device),
        max_model_len=max_model_len,
        block_size=config.block_size or DEFAULT_BLOCK_SIZE,
        enable_prefix_caching=True if config.enable_prefix_caching is None else config.enable_prefix_caching,
        enable_chunked_prefill=chunked,
        max_num_batched_tokens=max_batched,
        max_num_seqs=max_num_seqs,
    )


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        model,
        model_config,
        *,
        num_blocks: int,
        generation_config: dict[str, Any] | None = None,
        executor=None,
    ) -> None:
        """Prefer from_config; this expects a config already resolved by resolve_engine_config.
        executor: the TensorParallelExecutor whose other ranks run each step with this one."""
        self.config = config
        self.executor = executor
        self.model = model
        self.model_config = model_config
        self.max_model_len: int = config.max_model_len
        self.vocab_size: int = model_config.vocab_size
        self.max_logprobs = config.max_logprobs if config.max_logprobs >= 0 else model_config.vocab_size
        self.generation_config = dict(generation_config or {})
        self.eos_token_id, self.extra_stop_token_ids = _end_token_ids(model_config, self.generation_config)

        device = torch.device(config.device)
        dtype = next(model.parameters()).dtype
        block_size = config.block_size
        events = config.kv_events_config is not None and config.kv_events_config.enable_kv_cache_events
        self.block_pool = BlockPool(
            num_blocks,
            block_size,
            enable_caching=config.enable_prefix_caching,
            enable_kv_cache_events=bool(events),
            medium="GPU" if device.type == "cuda" else "CPU",
        )
        self.kv_cache_manager = KVCacheManager(
            self.block_pool, block_size, config.enable_prefix_caching, config.prefix_caching_hash_algo
        )
        self.scheduler = Scheduler(config, self.kv_cache_manager, self.max_model_len)
        self.runner = ModelRunner(
            model,
            model_config,
            num_blocks=num_blocks,
            block_size=block_size,
            kv_cache_dtype=config.kv_cache_dtype,
            device=device,
            dtype=dtype,
            seed=config.seed,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enforce_eager=config.enforce_eager,
            step_sender=executor,
        )
        self.async_scheduling = _resolve_async_scheduling(config, self.runner)
        self._ahead: tuple[ScheduledBatch, StepHandle] | None = None  # launched, tokens not read yet
        self.num_steps_ahead = 0  # steps launched before the step feeding them was read
        self.kv_connector: KVConnectorLike | None = None
        self._failed_transfers: list[RequestOutput] = []  # failed outputs not handed out yet
        self._live: set[str] = set()
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self._num_steps = 0

    @classmethod
    def from_config(cls, config: EngineConfig, *, model=None, model_config=None) -> LLMEngine:
        """Load (or take) the model, size the KV cache and build the engine.

        Passing `model` and `model_config` shares one loaded model between engines of
        different settings: the model holds only weights, each engine its own KV cache.
        A passed model keeps its own dtype and attention backend (--dtype is not applied).
        """
        device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        if config.tensor_parallel_size > 1:
            if model is not None:
                raise ValueError(
                    f"--tensor-parallel-size {config.tensor_parallel_size} loads the model in every rank; "
                    "pass a config with `model` set, not a loaded model"
                )
            return cls._from_config_tensor_parallel(config, device)
        source = None
        if model is None:
            from common.models.loader import load_model, load_model_config

            source = resolve_model(config.model, config.revision, config.download_dir)
            # settings are checked against the config before any weight is read
            config = resolve_engine_config(config, load_model_config(source, config.hf_config_path), device)
            model, model_config = load_model(
                source,
                load_format=config.load_format,
                dtype=config.dtype,
                device=device,
                attn_backend=get_attention_backend(device, config.kv_cache_dtype, config.max_model_len),
                hf_config_path=config.hf_config_path,
                seed=config.seed,
            )
        else:
            if model_config is None:
                model_config = model.config
            if config.model is not None:
                source = resolve_model(config.model, config.revision, config.download_dir)
            config = resolve_engine_config(config, model_config, device)
        return cls(
            config,
            model,
            model_config,
            num_blocks=kv_cache_num_blocks(config, model, model_config, device),
            generation_config=_generation_config(config, source),
        )

    @classmethod
    def _from_config_tensor_parallel(cls, config: EngineConfig, device: torch.device) -> LLMEngine:
        """Rank 0 of a tensor-parallel engine: start the other ranks, then load this rank's
        shard and size the cache together with them."""
        from common.distributed.executor import TensorParallelExecutor
        from common.models.loader import load_model, load_model_config

        source = resolve_model(config.model, config.revision, config.download_dir)
        config = resolve_engine_config(config, load_model_config(source, config.hf_config_path), device)
        executor = TensorParallelExecutor(config, device)
        try:
            group = executor.group
            model, model_config = load_model(
                source,
                load_format=config.load_format,
                dtype=config.dtype,
                device=group.device,
                attn_backend=get_attention_backend(group.device, config.kv_cache_dtype, config.max_model_len),
                hf_config_path=config.hf_config_path,
                seed=config.seed,
                tp_group=group,
            )
            num_blocks = kv_cache_num_blocks(config, model, model_config, group.device, group)
            return cls(
                dataclasses.replace(config, device=str(group.device)),
                model,
                model_config,
                num_blocks=num_blocks,
                generation_config=_generation_config(config, source),
                executor=executor,
            )
        except BaseException:
            executor.shutdown()
            raise

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks, if any (idempotent; also runs when the
        engine is collected or the process exits)."""
        if self.executor is not None:
            self.executor.shutdown()

    # -- requests ----------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
        kv_transfer_params: dict[str, Any] | None = None,
        prefill_only: bool = False,
    ) -> None:
        """Queue a request; ValueError (saying what to change) when it cannot run here.

        prefill_only: compute the prompt and sample the first token, then keep the blocks
        for a consumer; the finished output (finish_reason None, unless the first token
        already ends the request) carries the connector's kv_transfer_params.
        kv_transfer_params: the prompt's KV is at the producer they name, and
        params["first_token_id"] is the token it sampled; the request starts with that
        token as its first output (never output again here; max_tokens counts it).
        """
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is already running; give every request a unique id")
        connector = self.kv_connector
        if prefill_only and (connector is None or not connector.is_producer):
            raise ValueError(
                "prefill_only needs a KV connector that exports blocks; start this worker with "
                '--kv-transfer-config \'{"kv_connector": ..., "kv_role": "kv_producer"}\' (or kv_both)'
            )
        first_token = None
        if kv_transfer_params is not None:
            if connector is None or not connector.is_consumer:
                raise ValueError(
                    "kv_transfer_params need a KV connector that pulls blocks; start this worker with "
                    '--kv-transfer-config \'{"kv_connector": ..., "kv_role": "kv_consumer"}\' (or kv_both)'
                )
            first_token = _first_token_id(kv_transfer_params, self.vocab_size)
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError("the prompt is empty; send at least one token")
        low, high = min(prompt), max(prompt)
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"prompt token id {bad} is outside the model's vocabulary [0, {self.vocab_size})"
            )
        num_prompt, num_completion = len(prompt), sampling_params.max_tokens
        if num_prompt + num_completion > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {num_prompt + num_completion} tokens ({num_prompt} in the messages, "
                f"{num_completion} in the completion). Please reduce the length of the messages or completion."
            )
        sampling_params.validate(self.vocab_size, self.max_logprobs)
        if self.extra_stop_token_ids and not sampling_params.ignore_eos:
            # the model's other end-of-generation ids stop it too (generation_config eos list)
            stop_ids = list(dict.fromkeys([*sampling_params.stop_token_ids, *self.extra_stop_token_ids]))
            sampling_params = dataclasses.replace(sampling_params, stop_token_ids=stop_ids)
        request = Request(
            request_id,
            prompt,
            sampling_params,
            eos_token_id=self.eos_token_id,
            priority=priority,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            cache_salt=cache_salt,
        )
        if first_token is not None:
            request.append_output_token(first_token)
        self.scheduler.add_request(request, kv_transfer_params=kv_transfer_params, prefill_only=prefill_only)
        self._live.add(request_id)
        self._run_kv_orders()  # a first token that already ends it releases the producer now

    def abort_request(self, request_ids: str | Iterable[str]) -> list[RequestOutput]:
        """Stop requests and free their blocks; a finished "abort" output for each live one."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        live = [rid for rid in ids if rid in self._live]
        outputs = self.scheduler.abort_requests(live) or []
        self._live.difference_update(live)
        self._run_kv_orders()  # a request aborted before its pull releases the producer now
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._ahead is not None

    def has_schedulable_requests(self) -> bool:
        """Whether a step may compute something (not only wait for pulls), or has a launched
        step's tokens to hand out."""
        return self.scheduler.has_schedulable_requests() or self._ahead is not None

    def has_kv_transfers(self) -> bool:
        """Pulls in flight or blocks held for consumers: process_kv_transfers() has work."""
        return self.scheduler.has_kv_transfers() or bool(self._failed_transfers)

    @property
    def num_steps(self) -> int:
        """Steps that ran a batch so far (stats().num_steps without building the stats)."""
        return self._num_steps

    # -- KV transfer -------------------------------------------------------------------

    def attach_kv_connector(self, connector: KVConnectorLike) -> None:
        """Register this engine's KV cache with `connector` and drive it from now on.

        With tensor parallelism the connector must run one part per rank
        (kvtransfer.tp_connector.TensorParallelConnector): it starts the other ranks' parts
        through the executor, then registers rank 0's cache here."""
        if self.kv_connector is not None:
            raise RuntimeError("a KV connector is already attached to this engine")
        if self.config.tensor_parallel_size > 1:
            attach_ranks = getattr(connector, "attach_ranks", None)
            if attach_ranks is None:
                raise ValueError(
                    f"--tensor-parallel-size {self.config.tensor_parallel_size}: the KV connector "
                    f"{type(connector).__name__} serves one cache; build it with "
                    "kvtransfer.tp_connector.create_engine_connector(..., tp_size=N), which runs one per rank"
                )
            attach_ranks(self.executor)
        connector.register_kv_cache(self.runner.kv_cache)
        self.kv_connector = connector

    def process_kv_transfers(self) -> list[RequestOutput]:
        """Free the blocks consumers are done with, let landed pulls join the batch, handle
        failed ones, and start the pulls and releases the scheduler ordered. The outputs
        of requests that failed. step() calls it; call it alone while nothing runs."""
        connector = self.kv_connector
        if connector is None:
            return []
        if connector.is_producer:
            for request_id in connector.take_freed_requests():
                self.scheduler.free_held(request_id)
        if connector.is_consumer:
            done, failed = connector.poll()
            for request_id in done:
                self.scheduler.finish_kv_pull(request_id)
            for request_id, reason in failed:
                output = self.scheduler.fail_kv_pull(request_id, reason)
                if output is not None:
                    self._failed_transfers.append(output)
        self._run_kv_orders()
        return self._take_failed_transfers()

    def _take_failed_transfers(self) -> list[RequestOutput]:
        outputs, self._failed_transfers = self._failed_transfers, []
        for output in outputs:
            self._live.discard(output.request_id)
        return outputs

    def _run_kv_orders(self) -> None:
        """Start the pulls and send the releases the scheduler ordered; the outputs of the
        requests that fail here wait in _failed_transfers for the next step."""
        connector = self.kv_connector
        if connector is None:
            return
        pulls, releases = self.scheduler.take_kv_transfer_orders()
        for release in releases:
            connector.notify_done(release.request_id, release.params)
        for pull in pulls:
            try:
                connector.start_pull(
                    pull.request_id, pull.params, pull.local_block_ids, pull.remote_block_ids
                )
            except ValueError as e:  # no pull started: release the producer, then the policy decides
                connector.notify_done(pull.request_id, pull.params)
                output = self.scheduler.fail_kv_pull(pull.request_id, str(e))
                if output is not None:
                    self._failed_transfers.append(output)

    def _export_held(self, output: RequestOutput) -> None:
        """Lease a prefill_only request's blocks to its consumer; the params go in its output."""
        request_id = output.request_id
        request = self.scheduler.held[request_id]
        num_tokens = request.num_computed_tokens
        num_blocks = -(-num_tokens // self.config.block_size)
        block_ids = self.kv_cache_manager.get_block_ids(request_id)[:num_blocks]
        try:
            output.kv_transfer_params = self.kv_connector.export_blocks(request_id, block_ids, num_tokens)
        except Exception as e:  # the connector refused: nothing leased, so nothing to wait for
            self.scheduler.free_held(request_id)
            output.finish_reason = "abort"
            output.error = f"exporting the prompt's KV blocks failed: {type(e).__name__}: {e}"

    # -- the loop ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run and sample one step; the outputs of the requests that progressed.

        With async scheduling, a pure-decode step is launched and the step after it
        scheduled and launched too, before the first one's tokens are read: each call then
        hands out one step's outputs while the next step already runs on the GPU."""
        transfer_outputs = self.process_kv_transfers()
        if self._ahead is not None:
            batch, handle = self._ahead
            self._ahead = None
        else:
            batch = self.scheduler.schedule()
            # pulls admitted by this schedule start now and run while the model does
            self._run_kv_orders()
            transfer_outputs += self._take_failed_transfers()
            if not (self.async_scheduling and self._may_launch(batch)):
                return transfer_outputs + self._end_step(batch, self.runner.execute(batch))
            handle = self.runner.launch(batch)
        following = self.scheduler.schedule_ahead(batch, self._may_run_ahead)
        if following is not None:
            self._ahead = (following, self.runner.launch(following, feed=handle))
            self.num_steps_ahead += 1
        return transfer_outputs + self._end_step(batch, handle.result())

    def _may_launch(self, batch: ScheduledBatch) -> bool:
        """Whether a scheduled batch may run without waiting for its tokens: pure decode,
        every request sampling, none reading logprobs or its own history."""
        return bool(batch.requests) and all(
            n == 1 and r.num_computed_tokens + 1 == r.num_tokens and self._may_run_ahead(r, 0)
            for r, n in zip(batch.requests, batch.num_scheduled_tokens, strict=True)
        )

    @staticmethod
    def _may_run_ahead(request: Request, num_unknown: int = 1) -> bool:
        """Whether the request's next token may be sampled while `num_unknown` of its
        tokens are still on their way from the GPU."""
        return can_sample_ahead(request.sampling_params, request.num_output_tokens, num_unknown)

    def _end_step(self, batch: ScheduledBatch, sampled: dict[str, SampledToken]) -> list[RequestOutput]:
        """Count the step and hand its tokens to the scheduler: the outputs of the requests
        that progressed."""
        for request, n in zip(batch.requests, batch.num_scheduled_tokens, strict=True):
            # prefill work: every scheduled token but a sampled one fed back (a decode)
            feeds_back_output = batch.ahead or (
                request.num_output_tokens > 0 and request.num_computed_tokens + n == request.num_tokens
            )
            self._num_prompt_tokens += n - feeds_back_output
        if batch.requests:
            self._num_steps += 1
        outputs = self.scheduler.update_from_output(batch, sampled)
        self._num_generation_tokens += sum(len(o.new_token_ids) for o in outputs)
        for output in outputs:
            if output.finished:
                self._live.discard(output.request_id)
                if output.finish_reason is None and output.request_id in self.scheduler.held:
                    self._export_held(output)
        return outputs

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        progress: bool = False,
    ) -> list[list[int]]:
        """Run every prompt to the end, all batched together; the output token ids of each."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(params)} SamplingParams")
        prefix = f"generate-{next(_generate_calls)}-"
        ids = [f"{prefix}{i}" for i in range(len(prompts))]
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        for rid, prompt, p in zip(ids, prompts, params, strict=True):
            self.add_request(rid, prompt, p)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), desc="requests", unit="req")
        pending = set(ids)
        try:
            while pending:
                for output in self.step():
                    if output.request_id in results:
                        results[output.request_id].extend(output.new_token_ids)
                        if output.finished:
                            pending.discard(output.request_id)
                            if bar is not None:
                                bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            if pending:  # an exception left some running: do not leak their blocks
                self.abort_request(pending)
        return [results[rid] for rid in ids]

    # -- what the workers and the API read ---------------------------------------------

    def take_kv_events(self) -> list[KVEvent]:
        """KV events (BlockStored / BlockRemoved / AllBlocksCleared) since the last call."""
        return self.kv_cache_manager.take_events()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.kv_cache_manager.usage,
            prefix_cache_queries=self.kv_cache_manager.prefix_cache_queries,
            prefix_cache_hits=self.kv_cache_manager.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens,
            num_steps=self._num_steps,
            num_waiting_for_remote_kv=self.scheduler.num_waiting_for_remote_kv,
            num_held_requests=self.scheduler.num_held,
            num_queued_prefill_tokens=self.scheduler.num_queued_prefill_tokens,
            num_kv_load_failures=self.scheduler.num_kv_load_failures,
        )

    def default_sampling_overrides(self) -> dict[str, Any]:
        """The model's generation-config sampling defaults, then --override-generation-config,
        under SamplingParams' field names (max_new_tokens becomes max_tokens)."""
        return sampling_defaults(self.generation_config, self.config.override_generation_config)


_generate_calls = itertools.count()


def kv_cache_num_blocks(
    config: EngineConfig, model, model_config, device: torch.device, tp_group=None
) -> int:
    """Blocks of the KV cache for a resolved config (kv_cache_sizing.py decides). Every
    rank of `tp_group` calls it at once, sizing its own cache (its own KV heads, on CUDA its
    own profiling forward, run in step by all ranks); they agree on the smallest count."""
    dtype = next(model.parameters()).dtype
    kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype)

    def profile() -> None:
        profile_forward(
            model,
            model_config,
            num_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            block_size=config.block_size,
            kv_cache_dtype=kv_cache_dtype,
            device=device,
            dtype=dtype,
        )

    def determine() -> int:
        return determine_num_blocks(
            model_config=cache_model_config(model, model_config),
            block_size=config.block_size,
            kv_cache_dtype=kv_cache_dtype,
            device=device,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            num_gpu_blocks_override=config.num_gpu_blocks_override,
            kv_cache_memory_bytes=config.kv_cache_memory_bytes,
            gpu_memory_utilization=config.gpu_memory_utilization,
            profile_forward=profile,
        )

    if tp_group is None:
        return determine()
    error = None
    try:
        num_blocks = determine()
    except ValueError as e:  # still join the agreement, or the other ranks would wait forever
        num_blocks, error = 0, e
    agreed = tp_group.min_int(num_blocks)
    if agreed == 0:
        if error is not None:
            raise error
        raise ValueError(
            "another tensor-parallel rank has no room for the KV cache (its error is in its output); "
            "lower --max-model-len or give the cache more room"
        )
    return agreed


def _resolve_async_scheduling(config: EngineConfig, runner: ModelRunner) -> bool:
    """--async-scheduling, by default on where decode steps replay CUDA graphs."""
    if config.tensor_parallel_size > 1:
        if config.async_scheduling:
            raise ValueError(
                "--async-scheduling does not run with --tensor-parallel-size > 1 yet; "
                "pass --no-async-scheduling or leave it unset"
            )
        return False
    if config.async_scheduling is None:
        return runner.cuda_graphs is not None
    return config.async_scheduling


def _generation_config(config: EngineConfig, source) -> dict[str, Any]:
    folder = source.path if source is not None and source.kind == "hf_dir" else None
    return read_generation_config(config.generation_config, folder)


def _first_token_id(params: dict[str, Any], vocab_size: int) -> int:
    token = params.get("first_token_id") if isinstance(params, dict) else None
    if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
        raise ValueError(
            f"kv_transfer_params.first_token_id must be the token id the prefill worker sampled "
            f"(an int in [0, {vocab_size})), got {token!r}; the router adds it from the prefill answer"
        )
    return token


def _end_token_ids(model_config, generation_config: dict[str, Any]) -> tuple[int | None, list[int]]:
    """(EOS, the other ids that end a generation): the model's EOS first, then the
    generation config's eos_token_id list."""
    ids = list(model_config.eos_token_ids)
    extra = generation_config.get("eos_token_id")
    ids += [extra] if isinstance(extra, int) else list(extra or [])
    ids = list(dict.fromkeys(ids))
    if not ids:
        return None, []
    return ids[0], ids[1:]
