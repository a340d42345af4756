"""`pdserve bench decode-step`: its flags and its entry. Torch loads only when it runs, so
`pdserve bench` can list and parse every benchmark without it."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from dataclasses import asdict

from pdserve.bench.dummy_model import add_weight_args

DTYPES = ["bfloat16", "float16", "float32"]
FP8_SMALL_M_PATHS = ["scaled_mm", "triton", "both"]


def add_decode_step_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-config",
        default="llama-3-8b",
        help="a bundled config name (common/models/configs), a config.json or a model folder",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="Weight and activation dtype.")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (= --dtype) or fp8")
    add_weight_args(parser)
    parser.add_argument("--batch-sizes", default="1,64", help="Batch sizes to time, comma-separated.")
    parser.add_argument(
        "--context-len", type=int, default=1024, help="tokens in each sequence at the timed step"
    )
    parser.add_argument("--block-size", type=int, default=16, help="Tokens per KV-cache block.")
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's context")
    parser.add_argument("--rep-ms", type=float, default=1000.0, help="do_bench repetition time per figure")
    parser.add_argument("--engine-steps", type=int, default=48, help="whole engine steps timed per batch")
    parser.add_argument(
        "--hf-new-tokens",
        type=int,
        default=128,
        help="Tokens transformers' generate produces for its baseline.",
    )
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="time no CUDA graphs (eager steps only): for a model whose forward cannot be captured",
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also time graphs with cuBLAS matmuls, with torch layers and with each fusion switch flipped",
    )
    parser.add_argument(
        "--try",
        dest="try_switches",
        action="append",
        default=[],
        metavar="MODULE.NAME=VALUE[,...]",
        help="also time graphs recaptured with these module switches (modules: layers, kernels, tiles, "
        "decode, fp8, moe; values are Python literals), e.g. --try decode.MIN_SPLIT_TOKENS=256 or "
        "--try moe.USE_SMALL_BATCH_MOE=True; repeatable",
    )
    parser.add_argument(
        "--fp8-small-m",
        choices=FP8_SMALL_M_PATHS,
        default=None,
        help="with -q fp8, how fp8 matmuls of at most 16 rows run: scaled_mm (torch._scaled_mm, "
        "activations quantized per token), triton (the Triton small-M matmul, fp8 weights widened "
        "to bf16, activations left in bf16; common.models.fp8_weights.USE_TRITON_FP8_SMALL_M, what "
        "serving uses) for every figure, or both: the figures with scaled_mm and a column of graph "
        "replays with triton (default: triton)",
    )
    parser.add_argument("--profile", action="store_true", help="kernel breakdown of one replay")
    parser.add_argument("--gemv", action="store_true", help="time each weight's matmul at batch 1")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu (cpu: a tiny eager check)")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the dummy weights and the random K/V.")
    parser.add_argument(
        "--gemv-sweep",
        action="store_true",
        help="time every small-M matmul tile config on each weight shape with cold weights and print the best",
    )
    parser.add_argument(
        "--structured-outputs",
        action="store_true",
        help="also time the engine step with every sequence under a JSON schema, against the same step free",
    )
    parser.add_argument(
        "--grammar-tokenizer",
        default=None,
        help="tokenizer of the --structured-outputs grammars (a folder with tokenizer.json or a .gguf); "
        "default: the embedded model's, grown to the model's vocabulary with synthetic merges",
    )
    parser.add_argument(
        "--loras",
        type=int,
        default=0,
        help="also time the step with the batch spread over this many LoRA adapters (all seven target "
        "modules), against the base model and a naive per-request LoRA loop; 0: off",
    )
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of the --loras adapters")
    parser.add_argument("--json", dest="json_path", default=None, help="write the figures here as JSON")


def run_decode_step_bench(args: argparse.Namespace) -> int:
    """Run the benchmark and print its table; 0 on success."""
    if args.fp8_small_m is not None and args.quantization != "fp8":
        print(
            f"--fp8-small-m {args.fp8_small_m} picks the path of fp8 matmuls; pass -q fp8 with it, "
            "or leave it out",
            file=sys.stderr,
        )
        return 2
    args.fp8_small_m = args.fp8_small_m or "triton"
    from common.models import fp8_weights

    # "triton": every figure with the Triton path, set before the runner captures its graphs
    saved = fp8_weights.USE_TRITON_FP8_SMALL_M
    fp8_weights.USE_TRITON_FP8_SMALL_M = args.fp8_small_m == "triton"
    try:
        return _run(args)
    finally:
        fp8_weights.USE_TRITON_FP8_SMALL_M = saved


def _run(args: argparse.Namespace) -> int:
    import torch

    from pdserve.bench.decode_step.diagnostics import gemv_sweep, gemv_table, kernel_profile
    from pdserve.bench.decode_step.hf_baseline import hf_generate_tokens_per_s
    from pdserve.bench.decode_step.report import step_table
    from pdserve.bench.decode_step.step_bench import StepBench, measure_copy_bandwidth
    from pdserve.bench.dummy_model import config_path, load_dummy_model

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device)
    if args.device == "auto" and device.type != "cuda":
        print(
            "pdserve bench decode-step needs a CUDA device; pass --device cpu for a tiny eager check",
            file=sys.stderr,
        )
        return 2
    batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b})
    torch.manual_seed(args.seed)

    bandwidth = measure_copy_bandwidth(device)
    print(f"device-to-device copy: {bandwidth / 1e12:.3f} TB/s (bytes read + written)", flush=True)

    model, model_config, note = load_dummy_model(
        args.model_config,
        dtype=args.dtype,
        device=device,
        seed=args.seed,
        min_positions=args.max_model_len or 0,
        kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization,
        num_layers=args.num_layers,
    )
    if note:
        print(note, flush=True)
    max_model_len = args.max_model_len or model_config.max_position_embeddings
    dtype = next(model.parameters()).dtype
    bench = StepBench(model, model_config, args, device, dtype, batch_sizes, max_model_len)
    rows = bench.run(bandwidth)
    extra = {}
    if args.structured_outputs:
        from pdserve.bench.decode_step.constrained import constrained_table, engine_table, time_constrained

        extra["structured_outputs"] = time_constrained(bench, batch_sizes, args.grammar_tokenizer)
    if args.loras:
        from pdserve.bench.decode_step.lora import lora_table, time_lora

        lora_rows = time_lora(bench, batch_sizes, args.loras, args.lora_rank)
        extra["lora"] = {"data": lora_rows, "text": lora_table(lora_rows)}
    if args.gemv and device.type == "cuda":
        extra["gemv"] = gemv_table(bench, bandwidth)
    if args.gemv_sweep and device.type == "cuda":
        extra["gemv_sweep"] = gemv_sweep(bench)
    if args.profile and device.type == "cuda":
        extra["profile"] = kernel_profile(bench, batch_sizes[0])
    del bench, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    hf = not args.no_hf
    if hf and (args.quantization or args.num_layers or model_config.num_experts):
        print(
            "transformers baseline skipped: hf_baseline.py builds the whole config densely in --dtype, "
            "not an fp8, --num-layers or mixture-of-experts model (pass --no-hf to silence this)",
            flush=True,
        )
        hf = False
    if hf:
        for row in rows:
            row.hf_decode_tok_s, row.hf_total_tok_s = hf_generate_tokens_per_s(
                config_path(args.model_config),
                dtype,
                device,
                row.batch,
                args.context_len,
                args.hf_new_tokens,
                args.seed,
            )
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(
                f"transformers generate B={row.batch}: {row.hf_decode_tok_s:.1f} decode tok/s, "
                f"{row.hf_total_tok_s:.1f} tok/s with prefill",
                flush=True,
            )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print()
    for section in ("gemv", "gemv_sweep", "profile", "lora"):
        if section in extra:
            print(extra[section]["text"])
            print()
    print(step_table(rows, bandwidth, name, args))
    if "structured_outputs" in extra:
        print()
        print(constrained_table(extra["structured_outputs"]["data"]))
        print()
        print(engine_table(extra["structured_outputs"]["engine"]))
    if args.json_path:
        with open(args.json_path, "w") as f:
            payload = {
                "device": name,
                "copy_TBps": bandwidth / 1e12,
                "rows": [asdict(r) | {"ratio": r.ratio} for r in rows],
                **{k: v["data"] for k, v in extra.items()},
                **(
                    {"structured_outputs_engine": extra["structured_outputs"]["engine"]}
                    if "structured_outputs" in extra
                    else {}
                ),
            }
            json.dump(payload, f, indent=1)
    return 0
