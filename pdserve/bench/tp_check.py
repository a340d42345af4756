"""Check tensor parallelism on a machine: TP=N greedy tokens against one process, and step time.

    pdserve bench tp-check --tp 2 [--device cuda] [--model PATH] [--dtype float32]

Runs the same prompts greedily through an engine of one process and one of --tp ranks
(common/distributed/) and prints whether every token matches, with the wall time of each
generate. On CUDA with at least --tp devices the ranks use NCCL, one GPU each; with fewer
devices they share cuda:0 and reduce through gloo (a correctness check on a one-GPU
machine, not a speed figure). fp32 by default, where the two engines' logits differ only
by the order of the all-reduce's sums; in bf16 a near-tie may flip a greedy choice, so a
mismatch there is reported with the first differing position rather than as a failure of
the code. Exit status 0 when all tokens match.

`--random-layers N` (instead of --model) writes a random checkpoint of SmolLM2's shape
(9 query / 3 KV heads, so 2 ranks split it unevenly) with N layers to a temporary folder
and uses it, for machines without the embedded model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.config.engine_config import EngineConfig


def write_random_checkpoint(folder: Path, num_layers: int) -> str:
    """A Hugging Face folder of SmolLM2's shape with `num_layers` layers and random weights."""
    import torch
    from safetensors.torch import save_file

    from common.attention.reference import TorchAttentionBackend
    from common.models.config import ModelConfig
    from common.models.llama import LlamaForCausalLM

    hf = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(hf))
    model = LlamaForCausalLM(ModelConfig.from_hf_config(hf), TorchAttentionBackend())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.05, generator=generator)
    tensors = {name: t.clone().contiguous() for name, t in model.weight_targets().items()}
    save_file(tensors, str(folder / "model.safetensors"))
    return str(folder)


def _prompts(num: int, vocab_size: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(0)
    lengths = [5, 17, 64, 200][:num] + [33] * max(0, num - 4)
    return [torch.randint(10, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def _run(config: EngineConfig, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    from common.engine.llm_engine import LLMEngine
    from common.sampling_params import SamplingParams

    engine = LLMEngine.from_config(config)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2))  # warm-up
        start = time.perf_counter()
        outputs = engine.generate(prompts, params)
        return outputs, time.perf_counter() - start
    finally:
        engine.shutdown()


def add_tp_check_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=2, help="Tensor-parallel size to compare with one process.")
    parser.add_argument("--model", default=None, help="Model path (default: the embedded SmolLM2 GGUF).")
    parser.add_argument(
        "--random-layers", type=int, default=None, help="Use a random SmolLM2-shaped checkpoint of N layers."
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto.")
    parser.add_argument("--dtype", default="float32", help="Compute dtype (float32 compares exactly).")
    parser.add_argument("--load-format", default="auto", help="auto, gguf, safetensors or dummy.")
    parser.add_argument("--num-prompts", type=int, default=4, help="Prompts generated together.")
    parser.add_argument("--max-tokens", type=int, default=32, help="Tokens generated per prompt.")
    parser.add_argument("--max-model-len", type=int, default=1024, help="--max-model-len of both engines.")


def run_tp_check(args: argparse.Namespace) -> int:
    """Generate with one process and with --tp ranks, print the comparison as JSON; 0 when
    every token matches."""
    import torch

    from common.config.engine_config import EngineConfig
    from common.model_files import resolve_model
    from common.models.loader import load_model_config

    model = args.model
    if args.random_layers is not None:
        model = write_random_checkpoint(
            Path(tempfile.mkdtemp(prefix="pdserve-tp-check-")), args.random_layers
        )

    base = EngineConfig(
        model=model,
        device=args.device,
        dtype=args.dtype,
        load_format=args.load_format,
        max_model_len=args.max_model_len,
        kv_cache_memory_bytes=2**30,  # per rank; ranks sharing one GPU must not each claim a fraction
        seed=0,
    )
    vocab = load_model_config(resolve_model(model)).vocab_size
    prompts = _prompts(args.num_prompts, vocab)
    single, single_s = _run(base, prompts, args.max_tokens)
    parallel, parallel_s = _run(
        dataclasses.replace(base, tensor_parallel_size=args.tp), prompts, args.max_tokens
    )
    mismatches = [
        {
            "prompt": i,
            "first_differing_token": next(j for j, (a, b) in enumerate(zip(x, y, strict=True)) if a != b),
        }
        for i, (x, y) in enumerate(zip(single, parallel, strict=True))
        if x != y
    ]
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(
        json.dumps(
            {
                "tp": args.tp,
                "device": args.device,
                "cuda_devices": devices,
                "backend": "nccl" if devices >= args.tp and args.device != "cpu" else "gloo",
                "dtype": args.dtype,
                "tokens_match": not mismatches,
                "mismatches": mismatches,
                "generate_s_tp1": round(single_s, 3),
                f"generate_s_tp{args.tp}": round(parallel_s, 3),
            },
            indent=2,
        )
    )
    return 0 if not mismatches else 1
