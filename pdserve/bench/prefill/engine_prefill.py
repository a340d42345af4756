"""The timed part of `pdserve bench prefill`: an LLMEngine over a dummy-weight model, and
prefills of B prompts of L tokens through it, each from adding the prompts to the last
first token."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass

import torch

from common.config.engine_config import EngineConfig
from common.engine.kv_cache_sizing import blocks_for_tokens
from common.engine.llm_engine import LLMEngine
from common.sampling_params import SamplingParams
from pdserve.bench.model_costs import ModelCosts
from pdserve.bench.prefill.report import PrefillRow


@dataclass(frozen=True)
class Shape:
    """B prompts of L tokens, added to the engine at once."""

    prompts: int
    prompt_len: int


class PrefillBench:
    """An engine sized for the run's shapes; `time_shape` times one of them."""

    def __init__(self, model, model_config, args, device: torch.device, shapes: list[Shape]) -> None:
        self.device = device
        self.costs = ModelCosts.from_config(model_config)
        self.vocab = model_config.vocab_size
        self.rng = random.Random(args.seed)
        self.warmup = args.warmup
        self.repeats = args.repeats
        self.fp8 = args.quantization == "fp8"
        self._next_id = 0
        block = args.block_size
        longest = max(s.prompt_len for s in shapes) + 1  # the prompt and its one output token
        # room for the largest shape at once, the null block and a spare: a cache sized by
        # --gpu-memory-utilization would only add allocation time, never speed
        blocks = 2 + max(s.prompts * blocks_for_tokens(s.prompt_len + 1, block) for s in shapes)
        config = EngineConfig(
            device=str(device),
            max_model_len=longest,
            block_size=block,
            kv_cache_dtype=args.kv_cache_dtype,
            num_gpu_blocks_override=blocks,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=max(s.prompts for s in shapes),
            # a prefill never replays the decode graphs; capturing them would only cost start-up
            enforce_eager=True,
            seed=args.seed,
        )
        self.engine = LLMEngine.from_config(config, model=model, model_config=model_config)

    @property
    def max_num_batched_tokens(self) -> int:
        return self.engine.config.max_num_batched_tokens

    def prefill(self, shape: Shape) -> tuple[float, int]:
        """(ms, engine steps) of one prefill of `shape`, with fresh random prompts."""
        prompts = [
            [self.rng.randrange(self.vocab) for _ in range(shape.prompt_len)] for _ in range(shape.prompts)
        ]
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        engine = self.engine
        ids = [f"prefill-{self._next_id + i}" for i in range(shape.prompts)]
        self._next_id += shape.prompts
        self._synchronize()
        start = time.perf_counter()
        for request_id, prompt in zip(ids, prompts, strict=True):
            engine.add_request(request_id, prompt, params)
        waiting, steps = set(ids), 0
        while waiting:
            for output in engine.step():
                if output.new_token_ids:
                    if output.num_cached_tokens:  # a hit would time less than the prompt's work
                        raise RuntimeError(
                            f"{output.request_id} reused {output.num_cached_tokens} cached tokens; "
                            "the bench needs prompts the prefix cache has not seen"
                        )
                    waiting.discard(output.request_id)
            steps += 1
        self._synchronize()
        ms = (time.perf_counter() - start) * 1e3
        if engine.has_unfinished_requests():
            raise RuntimeError(
                "the engine still holds requests after every first token; it cannot time cleanly"
            )
        return ms, steps

    def time_shape(self, shape: Shape, matmul_rate: float, fp8_rate: float | None = None) -> PrefillRow:
        """The shape's median time against its floor: its FLOPs at `matmul_rate`, the fp8
        linears' part (with --quantization fp8) at `fp8_rate` when one was measured."""
        for _ in range(self.warmup):  # compiles every kernel this shape's steps need
            self.prefill(shape)
        runs = [self.prefill(shape) for _ in range(self.repeats)]
        times = [ms for ms, _ in runs]
        flops = self.costs.prefill_flops(shape.prompt_len, shape.prompts)
        fp8_flops = self.costs.prefill_fp8_flops(shape.prompt_len, shape.prompts) if self.fp8 else 0
        floor_s = (flops - fp8_flops) / matmul_rate + fp8_flops / (fp8_rate or matmul_rate)
        return PrefillRow(
            prompts=shape.prompts,
            prompt_len=shape.prompt_len,
            steps=runs[-1][1],
            ms=statistics.median(times),
            min_ms=min(times),
            flops=flops,
            attention_flops=shape.prompts * self.costs.attention_flops(shape.prompt_len),
            floor_ms=floor_s * 1e3,
            fp8_flops=fp8_flops,
        )

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
