"""`pdserve bench prefill`: its flags and its entry. Torch loads only when it runs, so
`pdserve bench` can list and parse every benchmark without it."""

from __future__ import annotations

import argparse
import json

from pdserve.bench.dummy_model import add_dummy_model_args


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_prefill_args(parser: argparse.ArgumentParser) -> None:
    add_dummy_model_args(parser)
    parser.add_argument(
        "--prompt-lens",
        default="2048,8192,32768",
        help="lengths of the single prompts to time, comma-separated",
    )
    parser.add_argument(
        "--batch-prompts",
        default="1,4,16",
        help="also time this many prompts of --batch-prompt-len added at once (whole-model MFU "
        "with the GPU full), comma-separated; empty: none",
    )
    parser.add_argument(
        "--batch-prompt-len", type=int, default=2048, help="tokens in each prompt of --batch-prompts"
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="the scheduler's token budget per step, which chunks long prompts (default: the "
        "serving default for the device)",
    )
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    parser.add_argument("--warmup", type=int, default=1, help="untimed prefills of each shape first")
    parser.add_argument("--repeats", type=int, default=5, help="timed prefills of each shape (median)")
    parser.add_argument(
        "--matmul-size",
        type=int,
        default=None,
        help="M = N = K of the torch.mm whose rate is the floor (default: 8192 on a GPU, 512 on CPU)",
    )
    parser.add_argument("--matmul-tries", type=int, default=5, help="timings of that matmul; the best counts")
    parser.add_argument(
        "--profile", action="store_true", help="also profile one prefill and group its kernels"
    )
    parser.add_argument(
        "--profile-len",
        type=int,
        default=None,
        help="prompt length --profile runs (default: the first of --prompt-lens)",
    )
    parser.add_argument("--profile-top", type=int, default=20, help="kernels --profile lists")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dummy weights and the prompts")
    parser.add_argument("--json", dest="json_path", default=None, help="write the rows here as JSON")


def run_prefill_bench(args: argparse.Namespace) -> int:
    """Run the benchmark and print its table last; 0 on success."""
    import torch

    from common.engine.engine_setup import resolve_device
    from pdserve.bench import timing
    from pdserve.bench.dummy_model import load_dummy_model
    from pdserve.bench.prefill.engine_prefill import PrefillBench, Shape
    from pdserve.bench.prefill.kernel_groups import profile_prefill, profile_tables
    from pdserve.bench.prefill.report import prefill_table

    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit(f"--repeats {args.repeats} must be at least 1 and --warmup {args.warmup} at least 0")
    device = resolve_device(args.device)
    shapes = [Shape(1, n) for n in _ints(args.prompt_lens)]
    shapes += [Shape(b, args.batch_prompt_len) for b in _ints(args.batch_prompts)]
    if not shapes:
        raise SystemExit("nothing to time: give --prompt-lens or --batch-prompts")
    profile_len = args.profile_len or shapes[0].prompt_len
    longest = max([s.prompt_len for s in shapes] + [profile_len]) + 1
    model, model_config, note = load_dummy_model(
        args.model_config,
        dtype=args.dtype,
        device=device,
        seed=args.seed,
        min_positions=longest,
        kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization,
        num_layers=args.num_layers,
    )
    if note:
        print(note, flush=True)
    dtype = next(model.parameters()).dtype

    def timer(fn) -> float:
        return timing.time_ms(fn, device, warmup_ms=25, rep_ms=200, host_repeats=3)

    size = args.matmul_size or (8192 if device.type == "cuda" else 512)
    rate = timing.matmul_rate(device, dtype, timer, size, args.matmul_tries)
    dtype_name = str(dtype).removeprefix("torch.")
    print(
        f"{dtype_name} matmul {size}^3: {rate / 1e12:.4g} TFLOP/s (best of {args.matmul_tries})", flush=True
    )
    fp8_rate = None
    if args.quantization == "fp8":
        fp8_rate = timing.fp8_matmul_rate(device, timer, size, args.matmul_tries)
        if fp8_rate is None:
            print(
                f"no fp8 matmul on {device.type}: the fp8 linears' FLOPs count at the {dtype_name} rate",
                flush=True,
            )
        else:
            print(
                f"fp8 matmul {size}^3: {fp8_rate / 1e12:.4g} TFLOP/s (torch._scaled_mm, row-wise)", flush=True
            )

    bench = PrefillBench(model, model_config, args, device, shapes + [Shape(1, profile_len)])
    rows = []
    for shape in shapes:
        rows.append(bench.time_shape(shape, rate, fp8_rate))
        r = rows[-1]
        print(
            f"{r.prompts} x {r.prompt_len} tokens: {r.ms:.3f} ms in {r.steps} steps; floor {r.floor_ms:.3f} ms "
            f"-> {r.ratio:.2f}x, {r.tflops:.4g} TFLOP/s, MFU {r.mfu:.1%}",
            flush=True,
        )
    profile_text = None
    profile_data = None
    if args.profile:
        shape = Shape(1, profile_len)
        bench.prefill(shape)  # warm at this shape, whatever the timed shapes were
        profile_data = profile_prefill(lambda: bench.prefill(shape), device, args.profile_top)
        profile_text = profile_tables(profile_data, f"1 prompt of {profile_len} tokens")

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    weights = dtype_name
    if args.quantization == "fp8":
        weights = f"fp8 linears (the rest {dtype_name})"
        if fp8_rate is not None:
            weights += f" at the fp8 matmul rate {fp8_rate / 1e12:.4g} TFLOP/s measured in this run"
    layers = f", {args.num_layers} layers" if args.num_layers else ""
    setting = (
        f"prefill to the first token on the engine: {args.model_config}{layers} (dummy weights), {weights}, "
        f"KV cache {args.kv_cache_dtype}, --max-num-batched-tokens {bench.max_num_batched_tokens}; "
        f"device {name}; {dtype_name} matmul {rate / 1e12:.4g} TFLOP/s measured in this run "
        f"(torch.mm {size}^3, best of {args.matmul_tries}); median of {args.repeats} after {args.warmup} warm-up"
    )
    print()
    if profile_text is not None:
        print(profile_text)
        print()
    print(prefill_table(rows, setting))
    if args.json_path:
        payload = {
            "device": name,
            "dtype": dtype_name,
            "model_config": args.model_config,
            "max_num_batched_tokens": bench.max_num_batched_tokens,
            "matmul_TFLOPs": rate / 1e12,
            "quantization": args.quantization,
            "fp8_matmul_TFLOPs": fp8_rate / 1e12 if fp8_rate is not None else None,
            "note": note,
            "rows": [r.as_dict() for r in rows],
            **({"profile": profile_data} if profile_data is not None else {}),
        }
        with open(args.json_path, "w") as f:
            json.dump(payload, f, indent=1)
    return 0
