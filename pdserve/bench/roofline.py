"""`pdserve bench roofline`: the fastest a serving workload could run on this device, and
how close a measured run came.

The workload is `pdserve bench serve --dataset-name random`'s: N requests of IN prompt
tokens and OUT output tokens, at most C at a time. Its floor is

    time_floor = N × prefill_flops(IN) / matmul rate
               + Σ over decode steps of max(step bytes / copy bandwidth, step FLOPs / matmul rate)

with prefill_flops from pdserve/bench/model_costs.py (matmuls, causal attention, the LM
head on the sampling row) and decode modelled as waves of C sequences advancing together
(the last wave the N mod C left over), each sequence making OUT - 1 decode steps after
its prefill's first token. Step s (1 ≤ s < OUT) of a wave of b sequences reads the weights
once (ModelCosts.decode_weight_bytes) and b × (IN + s) tokens of K/V; at serving batch
sizes the bytes bind, the FLOPs term only matters for very large batches. Prefill and
decode add up, as on one GPU that does both. The roofline's output tokens/s is N × OUT /
time_floor; given a measured output tokens/s (--measured, or a `bench serve
--save-result` JSON via --result, which also supplies the workload), it prints the
fraction reached.

The matmul rate (torch.mm, best of several) and the copy bandwidth (a 1 GiB device copy,
bytes read + written) are measured in the same run unless --matmul-tflops and
--copy-tbps give them; on CPU the same code runs with the CPU's own rates.

A mixture-of-experts model's FLOPs count each token's router and k experts, and a step of
b sequences reads the experts b tokens touch under uniform routing (model_costs.py). With
--quantization fp8 the fp8 linears' bytes are theirs (1 byte a weight and a scale a row),
and their FLOPs run at the fp8 matmul rate (torch._scaled_mm, measured on a GPU that has
it, else the 16-bit rate).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from pdserve.bench.dummy_model import add_dummy_model_args
from pdserve.bench.model_costs import ModelCosts
from pdserve.bench.table import format_table


@dataclass(frozen=True)
class Workload:
    input_len: int
    output_len: int
    num_requests: int
    concurrency: int


@dataclass(frozen=True)
class Roofline:
    prefill_flops: float
    prefill_s: float
    decode_steps: int
    decode_bytes: float
    decode_s: float
    compute_bound_steps: int  # decode steps whose FLOPs, not bytes, set their floor
    first_step_ms: float  # the floor of the first wave's first decode step (0 without decode)
    last_step_ms: float  # and of its last: the TPOT floor at that concurrency, start to end
    output_tokens: int

    @property
    def time_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.time_s


def serving_roofline(
    costs: ModelCosts,
    workload: Workload,
    *,
    matmul_rate: float,
    copy_bandwidth: float,
    bytes_per_param: float,
    kv_bytes_per_element: float,
    fp8_linears: bool = False,
    fp8_matmul_rate: float | None = None,
    fp8_experts: bool = False,
) -> Roofline:
    """The workload's floor (module docstring): rates in FLOP/s and bytes/s. fp8_linears:
    the linears fp8 keeps read at their bytes and, at `fp8_matmul_rate` if given, their FLOPs;
    fp8_experts: the experts read at fp8's bytes (their FLOPs stay at the dtype's rate: the
    fused MoE kernels multiply in the dtype)."""
    w = workload
    if min(w.input_len, w.output_len, w.num_requests, w.concurrency) < 1:
        raise ValueError(f"every length and count of the workload must be at least 1, got {w}")
    fp8_rate = fp8_matmul_rate if fp8_linears and fp8_matmul_rate else matmul_rate

    def compute_s(flops: float, fp8_flops: float) -> float:
        return (flops - fp8_flops) / matmul_rate + fp8_flops / fp8_rate

    prefill_flops = costs.prefill_flops(w.input_len, w.num_requests)
    prefill_fp8 = costs.prefill_fp8_flops(w.input_len, w.num_requests) if fp8_linears else 0
    kv_per_token = costs.kv_bytes_per_token(kv_bytes_per_element)
    steps, total_bytes, decode_s, compute_bound = 0, 0.0, 0.0, 0
    first_wave_ms: list[float] = []  # the step floors of the first (the fullest) wave
    remaining = w.num_requests
    while remaining:
        batch = min(w.concurrency, remaining)
        first_wave = remaining == w.num_requests
        remaining -= batch
        for s in range(1, w.output_len):
            context_total = batch * (w.input_len + s)
            weights = costs.decode_weight_bytes(
                batch, bytes_per_param, fp8_linears=fp8_linears, fp8_experts=fp8_experts
            )
            nbytes = weights + kv_per_token * context_total
            memory_s = nbytes / copy_bandwidth
            step_fp8 = costs.prefill_fp8_flops(1, batch) if fp8_linears else 0  # one token each
            step_s = compute_s(costs.decode_step_flops(batch, context_total), step_fp8)
            compute_bound += step_s > memory_s
            decode_s += max(memory_s, step_s)
            total_bytes += nbytes
            steps += 1
            if first_wave:
                first_wave_ms.append(max(memory_s, step_s) * 1e3)
    return Roofline(
        prefill_flops=prefill_flops,
        prefill_s=compute_s(prefill_flops, prefill_fp8),
        decode_steps=steps,
        decode_bytes=total_bytes,
        decode_s=decode_s,
        compute_bound_steps=compute_bound,
        first_step_ms=first_wave_ms[0] if first_wave_ms else 0.0,
        last_step_ms=first_wave_ms[-1] if first_wave_ms else 0.0,
        output_tokens=w.num_requests * w.output_len,
    )


def workload_from_result(result: dict) -> dict[str, int]:
    """The workload a `bench serve --save-result` JSON ran: its mean lengths per completed
    request (random prompts of one length give that length exactly), request count and
    concurrency (unlimited: every request at once)."""
    done = result.get("completed") or result["num_prompts"]
    return {
        "input_len": round(result["total_input_tokens"] / done),
        "output_len": round(result["total_output_tokens"] / done),
        "num_requests": done,
        "concurrency": result.get("max_concurrency") or done,
    }


def add_roofline_args(parser: argparse.ArgumentParser) -> None:
    add_dummy_model_args(parser)
    parser.add_argument("--input-len", type=int, default=None, help="prompt tokens a request (default 2048)")
    parser.add_argument("--output-len", type=int, default=None, help="output tokens a request (default 256)")
    parser.add_argument("--num-prompts", type=int, default=None, help="requests (default 64)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests at a time (default 64)")
    parser.add_argument(
        "--measured", type=float, default=None, help="a measured output tokens/s to set against the roofline"
    )
    parser.add_argument(
        "--result",
        default=None,
        help="a `pdserve bench serve --save-result` JSON: its output throughput is the measured figure "
        "and its run the workload (flags given here win)",
    )
    parser.add_argument(
        "--matmul-tflops", type=float, default=None, help="use this matmul rate instead of measuring it"
    )
    parser.add_argument(
        "--copy-tbps",
        type=float,
        default=None,
        help="use this copy bandwidth (TB/s, bytes read + written) instead of measuring it",
    )
    parser.add_argument(
        "--matmul-size",
        type=int,
        default=None,
        help="M = N = K of the timed torch.mm (default: 8192 on a GPU, 512 on CPU)",
    )
    parser.add_argument("--matmul-tries", type=int, default=5, help="timings of that matmul; the best counts")
    parser.add_argument("--json", dest="json_path", default=None, help="write the figures here as JSON")


_KV_BYTES = {"fp8": 1, "fp8_e4m3": 1, "bfloat16": 2, "float16": 2, "float32": 4}
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _measure_rates(
    args: argparse.Namespace, device, dtype
) -> tuple[float | None, float | None, float | None]:
    """(matmul FLOP/s, copy bytes/s, fp8 matmul FLOP/s), each measured here unless a flag
    gives it (then None); the fp8 rate only with --quantization fp8 on a GPU that has it."""
    from pdserve.bench import timing

    def timer(fn) -> float:
        return timing.time_ms(fn, device, warmup_ms=25, rep_ms=200, host_repeats=3)

    rate = bandwidth = fp8_rate = None
    size = args.matmul_size or (8192 if device.type == "cuda" else 512)
    if args.matmul_tflops is None:
        rate = timing.matmul_rate(device, dtype, timer, size, args.matmul_tries)
        if args.quantization == "fp8":
            fp8_rate = timing.fp8_matmul_rate(device, timer, size, args.matmul_tries)
    if args.copy_tbps is None:
        bandwidth = timing.copy_bandwidth(device, timer, cpu_bytes=1 << 26)
    return rate, bandwidth, fp8_rate


def run_roofline(args: argparse.Namespace) -> int:
    """Measure the rates, print the roofline (and the measured fraction) as a table; 0 on success."""
    import torch

    from common.engine.engine_setup import resolve_device
    from common.models.loader import resolve_dtype
    from pdserve.bench.dummy_model import read_model_config

    model_config = read_model_config(args.model_config, args.num_layers)
    costs = ModelCosts.from_config(model_config)
    result = None
    if args.result:
        with open(args.result) as f:
            result = json.load(f)
    given = {
        "input_len": args.input_len,
        "output_len": args.output_len,
        "num_requests": args.num_prompts,
        "concurrency": args.max_concurrency,
    }
    defaults = {"input_len": 2048, "output_len": 256, "num_requests": 64, "concurrency": 64}
    from_result = workload_from_result(result) if result is not None else {}
    fields = {k: v if v is not None else from_result.get(k, defaults[k]) for k, v in given.items()}
    workload = Workload(**fields)
    measured = args.measured if args.measured is not None else (result or {}).get("output_throughput")

    device = resolve_device(args.device)
    measuring = args.matmul_tflops is None or args.copy_tbps is None
    # with both rates given nothing runs here, so "auto" means the dtype a GPU would serve
    dtype = resolve_dtype(model_config.torch_dtype, args.dtype, device if measuring else "cuda")
    dtype_name = str(dtype).removeprefix("torch.")
    kv_name = dtype_name if args.kv_cache_dtype == "auto" else args.kv_cache_dtype
    if kv_name not in _KV_BYTES:
        raise SystemExit(
            f"--kv-cache-dtype {args.kv_cache_dtype!r}: use auto, fp8, bfloat16, float16 or float32"
        )
    rate, bandwidth, fp8_rate = _measure_rates(args, device, dtype)
    sources = {
        "matmul": "given" if rate is None else "measured",
        "copy": "given" if bandwidth is None else "measured",
    }
    rate = rate if rate is not None else args.matmul_tflops * 1e12
    bandwidth = bandwidth if bandwidth is not None else args.copy_tbps * 1e12
    rates = (
        f"{dtype_name} matmul {rate / 1e12:.4g} TFLOP/s ({sources['matmul']}), copy "
        f"{bandwidth / 1e12:.4g} TB/s ({sources['copy']}; bytes read + written)"
    )
    if fp8_rate is not None:
        rates += f", fp8 matmul {fp8_rate / 1e12:.4g} TFLOP/s (measured)"
    print(rates, flush=True)
    roof = serving_roofline(
        costs,
        workload,
        matmul_rate=rate,
        copy_bandwidth=bandwidth,
        bytes_per_param=_DTYPE_BYTES[dtype_name],
        kv_bytes_per_element=_KV_BYTES[kv_name],
        fp8_linears=args.quantization == "fp8",
        fp8_matmul_rate=fp8_rate,
        # a GPU keeps experts in fp8 (common/models/moe.py); the CPU dequantizes them
        fp8_experts=args.quantization == "fp8" and device.type == "cuda",
    )
    if not measuring:
        name = "none (rates given)"
    else:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    weights = dtype_name if args.quantization != "fp8" else f"fp8 linears, the rest {dtype_name}"
    layers = f" ({args.num_layers} layers)" if args.num_layers else ""
    setting = f"{args.model_config}{layers}, weights {weights}, KV cache {kv_name}"
    print()
    print(roofline_table(roof, workload, measured, setting, f"device {name}; {rates}"))
    if args.json_path:
        payload = {
            "device": name,
            "model_config": args.model_config,
            "dtype": dtype_name,
            "kv_cache_dtype": kv_name,
            "quantization": args.quantization,
            "matmul_TFLOPs": rate / 1e12,
            "fp8_matmul_TFLOPs": fp8_rate / 1e12 if fp8_rate is not None else None,
            "copy_TBps": bandwidth / 1e12,
            "rates": sources,
            "workload": asdict(workload),
            "roofline": asdict(roof) | {"time_s": roof.time_s, "output_tok_s": roof.output_tok_s},
            "measured_output_tok_s": measured,
            "fraction": measured / roof.output_tok_s if measured is not None else None,
        }
        with open(args.json_path, "w") as f:
            json.dump(payload, f, indent=1)
    return 0


def roofline_table(roof: Roofline, w: Workload, measured: float | None, model: str, rates: str) -> str:
    """The roofline and the measured fraction as one Markdown row, under the setting."""
    head = f"serving roofline: {model}; {rates}"
    header = [
        "in / out tokens",
        "requests",
        "concurrency",
        "prefill TFLOP",
        "prefill floor s",
        "decode steps",
        "decode GB read",
        "decode floor s",
        "step floor ms (first–last)",
        "floor s",
        "roofline out tok/s",
        "measured out tok/s",
        "of roofline",
    ]
    row = [
        f"{w.input_len} / {w.output_len}",
        str(w.num_requests),
        str(w.concurrency),
        f"{roof.prefill_flops / 1e12:.4g}",
        f"{roof.prefill_s:.4g}",
        str(roof.decode_steps),
        f"{roof.decode_bytes / 1e9:.4g}",
        f"{roof.decode_s:.4g}",
        f"{roof.first_step_ms:.3g}–{roof.last_step_ms:.3g}",
        f"{roof.time_s:.4g}",
        f"{roof.output_tok_s:.5g}",
        f"{measured:.5g}" if measured is not None else "-",
        f"{measured / roof.output_tok_s:.1%}" if measured is not None else "-",
    ]
    notes = []
    if roof.compute_bound_steps:
        notes.append(f"{roof.compute_bound_steps} of {roof.decode_steps} decode steps are compute-bound")
    table = format_table(header, [row], "r" * len(header))
    return "\n\n".join([head, *notes, table])
