"""--quantization (-q): how the model's weights are stored while it serves.

vLLM's rule: None reads the checkpoint's own format, and a GGUF file is served with its
blocks kept quantized ("gguf"). pdserve keeps GGUF's Q4_0, Q4_1 and Q8_0 blocks quantized on
the CPU (common/models/gguf_int4.py), where reading fp32 weights bounds a decode step; on a
GPU, or with tensor parallelism, a GGUF is dequantized to --dtype. "none" (pdserve's own
choice) always dequantizes: the fp32 path whose greedy outputs equal transformers'.
"""

from __future__ import annotations

from typing import Any

from common.config.arg_types import choice
from common.config.checkpoint_quantization import checkpoint_fp8_scheme

QUANTIZATION_METHODS = ("fp8", "gguf", "none")
QUANTIZATION_HELP = (
    "Method used to quantize the weights. If None, we first check the `quantization_config` "
    "attribute in the model config file; a GGUF model is served with its blocks kept quantized "
    '("gguf": Q4_0, Q4_1 and Q8_0 matmul weights through an int4 kernel with bf16 activations, on '
    "the CPU only; on a GPU or with --tensor-parallel-size > 1 it is dequantized), and an fp8 checkpoint "
    '("fp8": quant_method fp8 or compressed-tensors float-quantized) loads its fp8 weights and scales. '
    '"fp8" on a bf16/fp32 checkpoint quantizes the linear layers\' weights at load (per-output-channel '
    "scales, per-token dynamic activation scales; the embedding, LM head and norms stay in `dtype`). "
    "If there is none, "
    "we assume the model weights are not quantized and use `dtype` to determine the data type of "
    'the weights. "none" (pdserve only) dequantizes every weight to --dtype: on the CPU in fp32 '
    "the outputs equal transformers' (docs/quantization.md gives the quantized path's tolerance)."
)


def add_quantization_arg(group: Any) -> None:
    group.add_argument(
        "--quantization",
        "-q",
        type=choice(QUANTIZATION_METHODS),
        choices=QUANTIZATION_METHODS,
        default=None,
        help=QUANTIZATION_HELP,
    )


def resolve_quantization(
    requested: str | None,
    load_format: str,
    device_type: str,
    tensor_parallel_size: int,
    hf_config: dict[str, Any] | None = None,
) -> str | None:
    """The method the loader applies ("fp8", "gguf" or None for dense weights), or ValueError
    saying why the requested one cannot serve here. `hf_config` is the model's config.json:
    its `quantization_config` is checked here, at start, and an fp8 one chosen by None."""
    checkpoint_fp8 = load_format != "gguf" and checkpoint_fp8_scheme(hf_config or {}) is not None
    if requested == "none":
        return None
    if requested == "fp8" or (requested is None and checkpoint_fp8):
        if tensor_parallel_size != 1:
            raise ValueError(
                "fp8 weights do not run with --tensor-parallel-size > 1 yet; serve them with "
                "--tensor-parallel-size 1, or a bf16 checkpoint without --quantization fp8"
            )
        return "fp8"
    if requested is None:
        kept = load_format == "gguf" and device_type == "cpu" and tensor_parallel_size == 1
        return "gguf" if kept else None
    if requested == "gguf":
        if load_format != "gguf":
            raise ValueError(f"--quantization gguf needs a GGUF model; this one loads as {load_format}")
        if device_type != "cpu":
            raise ValueError(
                "--quantization gguf keeps the blocks quantized on the CPU only; on a GPU leave "
                "--quantization unset (the GGUF is dequantized to --dtype) or pass --device cpu"
            )
        if tensor_parallel_size != 1:
            raise ValueError(
                "--quantization gguf does not run with --tensor-parallel-size > 1; leave it unset"
            )
        return "gguf"
    raise ValueError(f"--quantization {requested!r} is not one of {', '.join(QUANTIZATION_METHODS)}")
