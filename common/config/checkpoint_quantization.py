"""What a Hugging Face checkpoint's `quantization_config` (in config.json) says, checked at start.

pdserve serves fp8 checkpoints in two layouts. Every quantized linear layer `P` (for
example `model.layers.0.self_attn.q_proj`) stores its values as `P.weight`, float8_e4m3fn
[N, K] (output features N, input features K), beside its scales:

**`quant_method: "fp8"`** (vLLM's Fp8Config, transformers' FineGrainedFP8Config)
    {"quant_method": "fp8", "activation_scheme": "dynamic" | "static",
     "weight_block_size": [bn, bk] | null, "scale_fmt": "float" (optional)}
- with `weight_block_size`: `P.weight_scale_inv` fp32 [ceil(N / bn), ceil(K / bk)], the
  scale of each bn × bk block (DeepSeek-V3's layout; despite its name it multiplies);
  `activation_scheme` must be "dynamic", as in vLLM;
- without: `P.weight_scale` (vLLM) or `P.weight_scale_inv` (transformers) fp32, one value
  (shape [], [1]) for the tensor, or [N] / [N, 1] for each output channel;
- `activation_scheme: "static"`: `P.input_scale` (vLLM) or `P.activation_scale`
  (transformers), one fp32 value: the activations' scale.

**`quant_method: "compressed-tensors"`** (llm-compressor's "float-quantized" format)
    {"quant_method": "compressed-tensors", "format": "float-quantized",
     "config_groups": {"group_0": {"targets": ["Linear"],
        "weights": {"type": "float", "num_bits": 8, "strategy": "tensor" | "channel" | "block",
                    "block_structure": [bn, bk] (block only)},
        "input_activations": null | {"type": "float", "num_bits": 8, "dynamic": true | false}}},
     "ignore": ["lm_head"]}
- `P.weight_scale` fp32 [1] (tensor), [N, 1] (channel) or [ceil(N / bn), ceil(K / bk)] (block);
- `input_activations` with `dynamic: false`: `P.input_scale` fp32 [1]. With `dynamic: true`
  (per token) or null (weight-only) the activations are quantized per token on the GPU.

A layer whose `weight` is stored in another dtype (the ignored ones: the LM head, typically)
loads densely. Anything else, an unknown `quant_method` included, is refused here, at start,
naming the field; a scale missing from the files is refused by the loader naming the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SERVED = "pdserve serves fp8 and gguf"


@dataclass(frozen=True)
class Fp8Scheme:
    """An fp8 checkpoint's layout: block size (None: per tensor or channel, told by the scales'
    shape) and whether activations have static scales stored with the weights."""

    method: str  # "fp8" | "compressed-tensors"
    block: tuple[int, int] | None
    static_activations: bool

    @property
    def scale_names(self) -> tuple[str, ...]:
        """A layer's weight-scale tensor, by the names the layout allows, first found wins."""
        if self.method == "fp8":
            return ("weight_scale_inv",) if self.block else ("weight_scale", "weight_scale_inv")
        return ("weight_scale",)

    @property
    def input_scale_names(self) -> tuple[str, ...]:
        return ("input_scale", "activation_scale") if self.method == "fp8" else ("input_scale",)


def checkpoint_fp8_scheme(hf_config: dict[str, Any]) -> Fp8Scheme | None:
    """The fp8 scheme of a config.json, None when it has no `quantization_config`; ValueError
    naming the field for a quantization pdserve does not serve."""
    qc = hf_config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"config.json quantization_config is {type(qc).__name__}, not an object")
    method = qc.get("quant_method")
    if method == "fp8":
        return _fp8(qc)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    raise ValueError(f"config.json quantization_config.quant_method {method!r} is not supported; {SERVED}")


def _fp8(qc: dict[str, Any]) -> Fp8Scheme:
    field = "config.json quantization_config"
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"{field}.activation_scheme {scheme!r} is not dynamic or static")
    if qc.get("scale_fmt", "float") != "float":
        raise ValueError(
            f'{field}.scale_fmt {qc["scale_fmt"]!r} is not supported; pdserve reads fp32 scales ("float")'
        )
    block = _block(qc.get("weight_block_size"), f"{field}.weight_block_size")
    if block is not None and scheme == "static":
        raise ValueError(
            f"{field}.activation_scheme 'static' with weight_block_size: block-wise fp8 takes dynamic "
            "activations only (as in vLLM)"
        )
    return Fp8Scheme("fp8", block, scheme == "static")


def _compressed_tensors(qc: dict[str, Any]) -> Fp8Scheme:
    field = "config.json quantization_config"
    if qc.get("kv_cache_scheme"):
        raise ValueError(
            f"{field}.kv_cache_scheme is not supported: pdserve does not read fp8 KV-cache scales "
            "from a checkpoint; remove it from config.json and choose --kv-cache-dtype instead"
        )
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{field}.config_groups is missing; a compressed-tensors config needs one group")
    schemes = set()
    for name, group in groups.items():
        where = f"{field}.config_groups.{name}"
        fmt = group.get("format", qc.get("format"))
        if fmt != "float-quantized":
            raise ValueError(
                f"{where}: format {fmt!r} is not supported; pdserve serves 'float-quantized' (fp8)"
            )
        weights = group.get("weights") or {}
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            raise ValueError(
                f"{where}.weights is {weights.get('type')!r} with {weights.get('num_bits')!r} bits; "
                "pdserve serves 8-bit float (fp8) weights"
            )
        strategy = weights.get("strategy")
        if strategy not in ("tensor", "channel", "block"):
            raise ValueError(f"{where}.weights.strategy {strategy!r} is not tensor, channel or block")
        block = None
        if strategy == "block":
            block = _block(weights.get("block_structure"), f"{where}.weights.block_structure")
            if block is None:
                raise ValueError(f"{where}.weights.block_structure is missing for strategy 'block'")
        acts = group.get("input_activations")
        static = False
        if acts is not None:
            if acts.get("type") != "float" or acts.get("num_bits") != 8:
                raise ValueError(f"{where}.input_activations: pdserve serves 8-bit float (fp8) activations")
            static = not acts.get("dynamic", False)
            if static and acts.get("strategy", "tensor") != "tensor":
                raise ValueError(
                    f"{where}.input_activations.strategy {acts.get('strategy')!r}: static activation "
                    "scales are served per tensor only"
                )
        schemes.add((block, static))
    if len(schemes) != 1:
        raise ValueError(
            f"{field}.config_groups differ in block size or activation scheme; pdserve serves one"
        )
    block, static = schemes.pop()
    return Fp8Scheme("compressed-tensors", block, static)


def _block(value: Any, field: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if not (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and v > 0 for v in value)
    ):
        raise ValueError(f"{field} {value!r} is not two positive integers [rows, columns]")
    return (value[0], value[1])
