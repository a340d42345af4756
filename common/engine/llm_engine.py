"""The engine loop: requests in, tokens out, one scheduled step at a time.

An LLMEngine wires the parts together: the scheduler decides who runs this step
(with the KV-cache manager and block pool behind it), the model runner packs the step,
runs the model and samples, and the scheduler turns the sampled tokens into outputs.
Setting it up (the device, the settings left to the model, loading, sizing the KV
cache) is engine_setup.py's; its counters are read through engine_stats.py.

For disaggregation a worker attaches a KV-transfer connector with its role's hooks
(`attach_kv_transfer`, kv_transfer_hooks.py): the engine registers its KV cache with
the connector and calls the hooks from its own thread, inside `step()` (or
`process_kv_transfers()` while it has nothing to run): for the connector's news at the
start of a step, with the scheduler's transfer orders after schedule(), when a
`prefill_only` request gets its first token, and to check a request at admission. What
a producer or a consumer does at each point is its role's policy, not the engine's
(docs/disaggregation-flow.md).

With --tensor-parallel-size N > 1 the engine's process is rank 0 of N
(common/distributed/): it spawns ranks 1..N-1, each loading its shard of the weights,
and every step its model runner hands them the step's inputs; all ranks run the same
forward, only rank 0 samples. shutdown() (or the engine being collected) stops them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from common.config.context_length import context_length_error
from common.config.engine_config import EngineConfig
from common.engine.block_pool import BlockPool
from common.engine.engine_setup import (
    end_token_ids,
    resolve_async_scheduling,
    resolve_device,
    set_up_engine,
    start_other_ranks,
)
from common.engine.engine_stats import EngineStats, collect_stats
from common.engine.kv_cache_manager import KVCacheManager
from common.engine.kv_cache_sizing import kv_cache_bytes_per_block
from common.engine.kv_transfer_hooks import KVTransferHooks
from common.engine.model_runner import ModelRunner, StepHandle
from common.engine.outputs import RequestOutput, SampledToken
from common.engine.remote_kv_states import LandedPull
from common.engine.request import Request
from common.engine.sampler import can_sample_ahead
from common.engine.scheduled_batch import ScheduledBatch
from common.engine.scheduler import Scheduler
from common.engine.structured_outputs import StructuredOutputs
from common.generation_config import sampling_defaults
from common.kv_connector import KVConnector
from common.kv_events import KVEvent
from common.lora.adapter_cache import AdapterCache
from common.lora.lora_request import LoRARequest
from common.lora.peft_adapter import LoRAError
from common.model_files import resolve_model
from common.sampling_params import SamplingParams
from common.tokenizer.tokenizer import Tokenizer, load_tokenizer


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
        """Prefer from_config; this expects a config already resolved
        (engine_setup.resolve_engine_config).
        executor: the TensorParallelExecutor whose other ranks run each step with this one."""
        self.config = config
        self.executor = executor
        self.model = model
        self.model_config = model_config
        self.max_model_len: int = config.max_model_len
        self.vocab_size: int = model_config.vocab_size
        self.max_logprobs = config.max_logprobs if config.max_logprobs >= 0 else model_config.vocab_size
        self.generation_config = dict(generation_config or {})
        self.eos_token_id, self.extra_stop_token_ids = end_token_ids(model_config, self.generation_config)

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
        lora = config.lora_config
        self.lora_cache: AdapterCache | None = None
        if lora.enable_lora:
            if config.tensor_parallel_size > 1:
                raise ValueError(
                    "--enable-lora does not run with --tensor-parallel-size > 1 yet; serve adapters "
                    "with one GPU per worker (more workers instead of wider ones)"
                )
            lora_dtype = dtype if lora.lora_dtype == "auto" else getattr(torch, lora.lora_dtype)
            self.lora_cache = AdapterCache(
                model_config, capacity=lora.cpu_capacity, max_rank=lora.max_lora_rank, dtype=lora_dtype
            )
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
            lora_config=lora,
            lora_cache=self.lora_cache,
            max_num_batched_tokens=config.max_num_batched_tokens,
        )
        for module in lora.lora_modules if lora.enable_lora else ():  # --lora-modules given to a worker: preload
            self.load_lora(LoRARequest(module.name, module.path, 1 + lora.lora_modules.index(module)))
        self.structured_outputs = StructuredOutputs(
            self._load_tokenizer, self.vocab_size, config.structured_outputs_config.backend
        )
        self.async_scheduling = resolve_async_scheduling(config, self.runner.cuda_graphs is not None)
        self._ahead: tuple[ScheduledBatch, StepHandle] | None = None  # launched, tokens not read yet
        self.num_steps_ahead = 0  # steps launched before the step feeding them was read
        self.kv_connector: KVConnector | None = None
        self._kv_hooks: list[KVTransferHooks] = []  # the role's (both roles' in a test engine)
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self._num_steps = 0

    @classmethod
    def from_config(cls, config: EngineConfig, *, model=None, model_config=None) -> LLMEngine:
        """Load (or take) the model, size the KV cache and build the engine.

        Passing `model` and `model_config` shares one loaded model between engines of
        different settings: the model holds only weights, each engine its own KV cache.
        A passed model keeps its own dtype and attention backend (--dtype is not applied).
        With tensor parallelism this process is rank 0: the other ranks start first, then
        every rank loads its shard and sizes its cache with the others.
        """
        device = resolve_device(config.device)
        executor = start_other_ranks(config, device, model)  # None without tensor parallelism
        group = None if executor is None else executor.group
        try:
            setup = set_up_engine(
                config,
                device if group is None else group.device,
                model=model,
                model_config=model_config,
                tp_group=group,
            )
            return cls(
                setup.config,
                setup.model,
                setup.model_config,
                num_blocks=setup.num_blocks,
                generation_config=setup.generation_config(),
                executor=executor,
            )
        except BaseException:
            if executor is not None:
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
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queue a request; ValueError (saying what to change) when it cannot run here
        (LoRAError, a ValueError with an HTTP status, when its adapter cannot be loaded).

        lora_request: run it under that adapter, read from its folder unless held.

        prefill_only: compute the prompt and sample the first token, then keep the blocks
        for a consumer; the finished output (finish_reason None, unless the first token
        already ends the request) carries the connector's kv_transfer_params.
        kv_transfer_params: the prompt's KV is at the producer they name, and
        params["first_token_id"] is the token it sampled; the request starts with that
        token as its first output (never output again here; max_tokens counts it).
        Both need the hooks of that side attached (attach_kv_transfer), which check them.
        """
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already running; give every request a unique id")
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError("the prompt is empty; send at least one token")
        low, high = min(prompt), max(prompt)
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"prompt token id {bad} is outside the model's vocabulary [0, {self.vocab_size})"
            )
        too_long = context_length_error(len(prompt), sampling_params.max_tokens, self.max_model_len)
        if too_long is not None:
            raise ValueError(too_long)
        sampling_params.validate(self.vocab_size, self.max_logprobs)
        if lora_request is not None:
            self.load_lora(lora_request)  # read and checked now, so a bad adapter fails this request only
        if self.extra_stop_token_ids and not sampling_params.ignore_eos:
            # the model's other end-of-generation ids stop it too (generation_config eos list)
            stop_ids = list(dict.fromkeys([*sampling_params.stop_token_ids, *self.extra_stop_token_ids]))
            sampling_params = dataclasses.replace(sampling_params, stop_token_ids=stop_ids)
        spec = sampling_params.structured_outputs
        request = Request(
            request_id,
            prompt,
            sampling_params,
            eos_token_id=self.eos_token_id,
            priority=priority,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            cache_salt=cache_salt,
            kv_transfer_params=kv_transfer_params,
            prefill_only=prefill_only,
            lora=lora_request,
            grammar=None if spec is None else self.structured_outputs.matcher_for(spec),
        )
        self._admit_kv_transfer(request)
        self.scheduler.add_request(request)
        self._run_kv_orders()  # a first token that already ends it releases the producer now

    def _admit_kv_transfer(self, request: Request) -> None:
        """Let the attached hooks check (and complete) a request; refuse a prefill_only or
        remote-KV one that no hook set takes charge of."""
        claimed = [hooks.admit(request) for hooks in self._kv_hooks]
        if any(claimed):
            return
        if request.prefill_only:
            raise ValueError(
                "prefill_only needs a KV connector that exports blocks; start this worker with "
                '--kv-transfer-config \'{"kv_connector": ..., "kv_role": "kv_producer"}\' (or kv_both)'
            )
        if request.kv_transfer_params is not None:
            raise ValueError(
                "kv_transfer_params need a KV connector that pulls blocks; start this worker with "
                '--kv-transfer-config \'{"kv_connector": ..., "kv_role": "kv_consumer"}\' (or kv_both)'
            )

    # -- LoRA adapters -------------------------------------------------------------------

    def load_lora(self, lora: LoRARequest) -> None:
        """Read adapter `lora` into host memory (if not held yet), checked against the model;
        LoRAError when it cannot be served. Its device slot is filled when a step runs it."""
        if self.lora_cache is None:
            raise LoRAError(
                f"LoRA adapter {lora.name!r}: this worker runs without --enable-lora; start it with "
                "--enable-lora (and --max-lora-rank at least the adapters' rank)"
            )
        self.lora_cache.get(lora)

    def unload_lora(self, name: str) -> bool:
        """Forget adapter `name`; False when it was not held. Requests running under it
        finish under it; a later request naming it reads it again."""
        if self.lora_cache is None:
            return False
        held = self.lora_cache.drop(name)
        if self.runner.lora_slots is not None and not any(
            r.lora is not None and r.lora.name == name for r in self.scheduler.requests.values()
        ):
            self.runner.lora_slots.forget(name)
        return held

    def lora_names(self) -> list[str]:
        """The adapters held in host memory, least recently used first."""
        return [] if self.lora_cache is None else self.lora_cache.names()

    def abort_request(self, request_ids: str | Iterable[str]) -> list[RequestOutput]:
        """Stop requests and free their blocks; a finished "abort" output for each live one."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        outputs = self.scheduler.abort_requests(ids)
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
        return self.scheduler.has_kv_transfers()

    @property
    def num_steps(self) -> int:
        """Steps that ran a batch so far (stats().num_steps without building the stats)."""
        return self._num_steps

    def _load_tokenizer(self) -> Tokenizer:
        """The model's tokenizer (for grammars: the engine itself reads token ids only)."""
        config = self.config
        return load_tokenizer(
            resolve_model(config.model, config.revision, config.download_dir), config.tokenizer
        )

    # -- KV transfer -------------------------------------------------------------------

    def attach_kv_transfer(self, connector: KVConnector, hooks: Sequence[KVTransferHooks]) -> None:
        """Register this engine's KV cache with `connector` and call `hooks` (the role's,
        built around the same connector) from now on.

        With tensor parallelism the connector runs one part per rank: it starts the other
        ranks' parts through the executor, then registers rank 0's cache here."""
        if self.kv_connector is not None:
            raise RuntimeError("a KV connector is already attached to this engine")
        if self.config.tensor_parallel_size > 1:
            connector.attach_ranks(self.executor)  # ValueError from a connector of one cache
        connector.register_kv_cache(self.runner.kv_cache)
        self.kv_connector = connector
        self._kv_hooks = list(hooks)

    def process_kv_transfers(self) -> None:
        """Hand the connector's news to the hooks (landed and failed pulls, blocks consumers
        are done with), then the transfer orders. step() calls it; call it alone while
        nothing runs. Requests failed here come out of the next step's outputs."""
        for hooks in self._kv_hooks:
            hooks.on_step_start()
        self._run_kv_orders()

    def _run_kv_orders(self) -> None:
        """Hand the pulls and releases the scheduler ordered to the hooks."""
        if not self._kv_hooks:
            return
        pulls, releases = self.scheduler.take_kv_transfer_orders()
        if pulls or releases:
            for hooks in self._kv_hooks:
                hooks.on_orders(pulls, releases)

    # -- the loop ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run and sample one step; the outputs of the requests that progressed.

        With async scheduling, a pure-decode step is launched and the step after it
        scheduled and launched too, before the first one's tokens are read: each call then
        hands out one step's outputs while the next step already runs on the GPU."""
        self.process_kv_transfers()
        if self._ahead is not None:
            batch, handle = self._ahead
            self._ahead = None
            handle.sample()  # the step before it is in: its grammars' masks can be filled
        else:
            batch = self.scheduler.schedule()
            # pulls admitted by this schedule start now and run while the model does
            self._run_kv_orders()
            if not (self.async_scheduling and self._may_launch(batch)):
                return self._end_step(batch, self.runner.execute(batch))
            handle = self.runner.launch(batch)
        following = self.scheduler.schedule_ahead(batch, self._may_run_ahead)
        if following is not None:
            self._ahead = (following, self.runner.launch(following, feed=handle))
            self.num_steps_ahead += 1
        return self._end_step(batch, handle.result())

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
            if output.finished and output.finish_reason is None:
                held = self.scheduler.held_request(output.request_id)
                if held is not None:  # a prefill_only request's first token: its blocks stay
                    for hooks in self._kv_hooks:
                        hooks.on_first_token(held, output)
        return outputs

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
        progress: bool = False,
        loras: Sequence[LoRARequest | None] | None = None,
    ) -> list[list[int]]:
        """Run every prompt to the end, all batched together; the output token ids of each.
        loras: the adapter of each prompt (None: the base model)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        loras = [None] * len(prompts) if loras is None else list(loras)
        if len(params) != len(prompts) or len(loras) != len(prompts):
            raise ValueError(
                f"generate: {len(prompts)} prompts but {len(params)} SamplingParams and {len(loras)} adapters"
            )
        prefix = f"generate-{next(_generate_calls)}-"
        ids = [f"{prefix}{i}" for i in range(len(prompts))]
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        for rid, prompt, p, lora in zip(ids, prompts, params, loras, strict=True):
            self.add_request(rid, prompt, p, lora_request=lora)
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

    def take_landed_kv_pulls(self) -> tuple[LandedPull, ...]:
        """Pulls whose blocks became usable since the last call, each timed from its role's
        hand-off to the connector until its request left the remote-KV wait."""
        return self.scheduler.remote.take_landed()

    @functools.cached_property
    def kv_block_bytes(self) -> int:
        """KV bytes of one block of the whole model (all layers, K and V, every rank's KV
        heads): what pulling one block moves."""
        return kv_cache_bytes_per_block(
            self.model_config, self.kv_cache_manager.block_size, self.runner.kv_cache.dtype
        )

    def stats(self) -> EngineStats:
        return collect_stats(
            self.scheduler,
            self.kv_cache_manager,
            num_prompt_tokens=self._num_prompt_tokens,
            num_generation_tokens=self._num_generation_tokens,
            num_steps=self._num_steps,
        )

    def default_sampling_overrides(self) -> dict[str, Any]:
        """The model's generation-config sampling defaults, then --override-generation-config,
        under SamplingParams' field names (max_new_tokens becomes max_tokens)."""
        return sampling_defaults(self.generation_config, self.config.override_generation_config)


_generate_calls = itertools.count()
