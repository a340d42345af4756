"""The engine loop: requests in, tokens out, one scheduled step at a time.

An LLMEngine wires the parts together: the scheduler decides who runs this step
(with the KV-cache manager and block pool behind it), the model runner packs the step,
runs the model and samples, and the scheduler turns the sampled tokens into outputs.
It also resolves the settings EngineConfig leaves to the model and the device
(`resolve_engine_config`) and the model's generation-config defaults.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.attention.backend_select import get_attention_backend
from common.config.engine_config import EngineConfig
from common.engine.block_pool import BlockPool
from common.engine.kv_cache_manager import KVCacheManager
from common.engine.kv_cache_sizing import determine_num_blocks
from common.engine.model_runner import ModelRunner, profile_forward, resolve_kv_cache_dtype
from common.engine.outputs import RequestOutput
from common.engine.request import Request
from common.engine.scheduler import Scheduler
from common.kv_events import KVEvent
from common.model_files import ModelSource, resolve_model
from common.sampling_params import SamplingParams

DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_NUM_SEQS = 256
# Token budget per step with chunked prefill. vLLM's default is 2048 for serving (8192
# and up on large GPUs); a CPU step of 2048 tokens already takes seconds, so more would
# only delay the running decodes, while a GPU forward of 8192 tokens keeps it busy.
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cpu": 2048, "cuda": 8192}
# Without chunked prefill a whole prompt must fit in one step.
MIN_UNCHUNKED_BATCHED_TOKENS = 2048

# generation_config.json keys the API layer takes as defaults, under SamplingParams' names
_GENERATION_DEFAULT_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
    "max_tokens": "max_tokens",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu or auto")
    return torch.device(device)


def resolve_engine_config(config: EngineConfig, model_config, device: torch.device) -> EngineConfig:
    """A copy of `config` with every None filled from the model and the device, and checked."""
    if config.tensor_parallel_size != 1:
        raise ValueError(
            f"--tensor-parallel-size {config.tensor_parallel_size}: this engine runs the model on one "
            "device; tensor parallelism is not implemented yet, so pass 1 (or leave the flag out)"
        )
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


def read_generation_config(config: EngineConfig, source: ModelSource | None) -> dict[str, Any]:
    """generation_config.json as --generation-config says: "auto" the model folder's
    (a GGUF file has none), "vllm" none, anything else a folder holding one."""
    if config.generation_config == "vllm":
        return {}
    if config.generation_config == "auto":
        if source is None or source.kind != "hf_dir":
            return {}
        folder = source.path
    else:
        folder = Path(config.generation_config).expanduser()
        if not folder.is_dir():
            raise ValueError(
                f"--generation-config {config.generation_config}: not a folder; "
                "pass auto, vllm, or a folder holding generation_config.json"
            )
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}); fix it or pass --generation-config vllm"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; fix it or pass --generation-config vllm")
    return data


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        model,
        model_config,
        *,
        num_blocks: int,
        generation_config: dict[str, Any] | None = None,
    ) -> None:
        """Prefer from_config; this expects a config already resolved by resolve_engine_config."""
        self.config = config
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
        )
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

        num_blocks = determine_num_blocks(
            model_config=model_config,
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
        return cls(
            config,
            model,
            model_config,
            num_blocks=num_blocks,
            generation_config=read_generation_config(config, source),
        )

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
    ) -> None:
        """Queue a request; ValueError (saying what to change) when it cannot run here."""
        if request_id in self._live:
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
        self.scheduler.add_request(request)
        self._live.add(request_id)

    def abort_request(self, request_ids: str | Iterable[str]) -> list[RequestOutput]:
        """Stop requests and free their blocks; a finished "abort" output for each live one."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        live = [rid for rid in ids if rid in self._live]
        outputs = self.scheduler.abort_requests(live) or []
        self._live.difference_update(live)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # -- the loop ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run and sample one step; the outputs of the requests that progressed."""
        batch = self.scheduler.schedule()
        sampled = self.runner.execute(batch)
        for request, n in zip(batch.requests, batch.num_scheduled_tokens, strict=True):
            # prefill work: every scheduled token but a sampled one fed back (a decode)
            feeds_back_output = (
                request.num_output_tokens > 0 and request.num_computed_tokens + n == request.num_tokens
            )
            self._num_prompt_tokens += n - feeds_back_output
        self._num_generation_tokens += len(sampled)
        if batch.requests:
            self._num_steps += 1
        outputs = self.scheduler.update_from_output(batch, sampled)
        for output in outputs:
            if output.finished:
                self._live.discard(output.request_id)
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
        )

    def default_sampling_overrides(self) -> dict[str, Any]:
        """The model's generation-config sampling defaults, then --override-generation-config,
        under SamplingParams' field names (max_new_tokens becomes max_tokens)."""
        overrides: dict[str, Any] = {}
        for source in (self.generation_config, self.config.override_generation_config or {}):
            for key, value in source.items():
                name = _GENERATION_DEFAULT_KEYS.get(key)
                if name is not None and value is not None:
                    overrides[name] = value
        return overrides


_generate_calls = itertools.count()


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
