"""ModelConfig: the shape of a Llama-family decoder (dense or mixture-of-experts), read from
config.json or GGUF metadata.

Torch-free (plain dataclass, json, and common/gguf_file.py, which needs numpy only), so the
router and the CLI can learn a model's vocabulary size and context length without loading
torch.

Sliding-window attention (Mistral 7B v0.1, Qwen with use_sliding_window) is not
implemented; such a model is served with its context capped at the window size, where
windowed and full attention are the same. `sliding_window` records the original window.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.gguf_file import GGUFFile

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
)

_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
# HF config classes' defaults for keys a config.json may leave out.
_DEFAULT_MAX_POSITIONS = {
    "LlamaForCausalLM": 2048,
    "MistralForCausalLM": 4096 * 32,
    "Qwen2ForCausalLM": 32768,
    "Qwen3ForCausalLM": 32768,
    "Qwen3MoeForCausalLM": 32768,
    "MixtralForCausalLM": 4096 * 32,
}
_SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "freq_factors")

_GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# general.file_type -> the dtype the weights were exported in; quantized files compute in bf16.
_GGUF_FILE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None for plain RoPE; else a dict with "rope_type" in _SUPPORTED_ROPE_TYPES and its
    # parameters ("llama3": factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings; "linear": factor; "freq_factors": factors, one
    # divisor per frequency, as GGUF files of Llama 3.1+ store them).
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2; Llama/Qwen3 when set)
    attention_out_bias: bool = False  # bias on o_proj (Llama/Qwen3 attention_bias; never Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "float32"
    sliding_window: int | None = None  # informative only: max_position_embeddings is capped to it
    # Mixture-of-experts (Qwen3-MoE, Mixtral; common/models/moe.py): every layer's MLP is
    # num_experts SiLU-gated MLPs of width moe_intermediate_size, num_experts_per_tok of
    # them per token; norm_topk_prob renormalises the chosen experts' weights. 0: dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # raw source config

    def __post_init__(self) -> None:
        if self.hidden_act != "silu":
            raise ValueError(
                f"{self.architecture}: hidden_act {self.hidden_act!r} is not supported; "
                "pdserve implements SiLU-gated MLPs only"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{self.architecture}: num_attention_heads {self.num_attention_heads} is not a "
                f"multiple of num_key_value_heads {self.num_key_value_heads}"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in _SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"{self.architecture}: RoPE scaling {rope_type!r} is not supported "
                f"(supported: {', '.join(_SUPPORTED_ROPE_TYPES)}); remove rope_scaling from "
                "config.json (or pass --hf-config-path) to run without it"
            )
        if self.sliding_window is not None and self.sliding_window < self.max_position_embeddings:
            self.max_position_embeddings = self.sliding_window
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"{self.architecture}: num_experts_per_tok {self.num_experts_per_tok} must be between 1 "
                f"and the number of experts, {self.num_experts}; the config.json is inconsistent"
            )

    @property
    def mlp_width(self) -> int:
        """The intermediate width of each layer's MLP: an expert's for a mixture-of-experts model."""
        return self.moe_intermediate_size if self.num_experts else self.intermediate_size

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """From a Hugging Face config.json (transformers 4.x and 5.x spellings)."""
        architectures = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        arch = (
            architectures[0] if architectures else _MODEL_TYPES.get(model_type, f"model_type={model_type!r}")
        )
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {arch} is not supported; pdserve runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

        def need(key: str) -> Any:
            if cfg.get(key) is None:
                raise ValueError(f"config.json of a {arch} has no {key!r}; the file is incomplete")
            return cfg[key]

        if cfg.get("mlp_bias"):
            raise ValueError(f"{arch} with mlp_bias=true is not supported")
        heads = need("num_attention_heads")
        rope_theta, rope_scaling = _hf_rope(cfg)
        bias = bool(cfg.get("attention_bias", False))
        is_qwen2 = arch == "Qwen2ForCausalLM"
        moe = _hf_moe(arch, cfg, need)
        return cls(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or need("hidden_size") // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[arch],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=True if is_qwen2 else bias,
            attention_out_bias=False if is_qwen2 else bias,
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            hidden_act=cfg.get("hidden_act", "silu"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            sliding_window=_hf_sliding_window(arch, cfg),
            extra=dict(cfg),
            **moe,
        )

    @classmethod
    def from_gguf(cls, file: GGUFFile) -> ModelConfig:
        """From the metadata of a GGUF file (architectures llama, mistral, qwen2, qwen3)."""
        get = file.metadata.get

        gguf_arch = get("general.architecture")
        arch = _GGUF_ARCHITECTURES.get(gguf_arch)
        if arch is None:
            raise ValueError(
                f"GGUF architecture {gguf_arch!r} is not supported; pdserve runs GGUF files of "
                f"architecture {', '.join(_GGUF_ARCHITECTURES)}"
            )

        def need(key: str) -> Any:
            value = get(f"{gguf_arch}.{key}")
            if value is None:
                raise ValueError(f"GGUF file has no {gguf_arch}.{key}; it is incomplete")
            return value

        heads = need("attention.head_count")
        hidden = need("embedding_length")
        tensor_names = {t.name for t in file.tensors}
        vocab = get(f"{gguf_arch}.vocab_size")
        if vocab is None:
            vocab = len(file.metadata["tokenizer.ggml.tokens"])
        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=need("feed_forward_length"),
            num_hidden_layers=need("block_count"),
            num_attention_heads=heads,
            num_key_value_heads=get(f"{gguf_arch}.attention.head_count_kv") or heads,
            head_dim=get(f"{gguf_arch}.attention.key_length") or hidden // heads,
            rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            rope_theta=float(get(f"{gguf_arch}.rope.freq_base", 10000.0)),
            rope_scaling=_gguf_rope_scaling(file, gguf_arch),
            max_position_embeddings=need("context_length"),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            attention_out_bias="blk.0.attn_output.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            bos_token_id=get("tokenizer.ggml.bos_token_id"),
            eos_token_id=get("tokenizer.ggml.eos_token_id"),
            torch_dtype=_GGUF_FILE_DTYPES.get(get("general.file_type"), "bfloat16"),
            sliding_window=get(f"{gguf_arch}.attention.sliding_window"),
            extra={"gguf_architecture": gguf_arch},
        )


def _hf_rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and rope scaling from `rope_theta`+`rope_scaling` (4.x) or `rope_parameters` (5.x)."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    params.update(scaling)
    theta = float(params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    return theta, {"rope_type": rope_type, **params}


def _hf_sliding_window(arch: str, cfg: dict[str, Any]) -> int | None:
    window = cfg.get("sliding_window")
    if arch == "MistralForCausalLM":
        return window
    layer_types = cfg.get("layer_types") or []
    if cfg.get("use_sliding_window") or "sliding_attention" in layer_types:
        return window
    return None


def _hf_moe(arch: str, cfg: dict[str, Any], need) -> dict[str, Any]:
    """The mixture-of-experts fields of a Qwen3-MoE or Mixtral config.json ({} for a dense
    model); a field whose value pdserve does not implement is refused by name."""
    if arch == "Qwen3MoeForCausalLM":
        # every layer sparse, no shared expert: what Qwen3-MoE checkpoints use
        unsupported = (
            ("decoder_sparse_step", cfg.get("decoder_sparse_step", 1), (None, 1)),
            ("mlp_only_layers", cfg.get("mlp_only_layers"), (None, [])),
            ("shared_expert_intermediate_size", cfg.get("shared_expert_intermediate_size"), (None, 0)),
        )
        for name, value, supported in unsupported:
            if value not in supported:
                raise ValueError(
                    f"{arch}: {name}={value!r} is not supported; pdserve runs Qwen3-MoE models whose "
                    "every layer is a mixture of experts without a shared expert "
                    "(decoder_sparse_step 1, mlp_only_layers empty, no shared_expert_intermediate_size)"
                )
        experts = cfg.get("num_experts") or cfg.get("num_local_experts")
        if not experts:
            raise ValueError(f"config.json of a {arch} has no 'num_experts'; the file is incomplete")
        return {
            "num_experts": experts,
            "num_experts_per_tok": need("num_experts_per_tok"),
            "moe_intermediate_size": need("moe_intermediate_size"),
            "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
        }
    if arch == "MixtralForCausalLM":
        # router_jitter_noise perturbs the router in training only; output_router_logits
        # asks for the auxiliary loss's inputs: neither changes inference.
        window = cfg.get("sliding_window")
        positions = cfg.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[arch]
        if window is not None and window < positions:
            raise ValueError(
                f"{arch}: sliding_window={window} is not supported (pdserve attends over the whole "
                f"context, max_position_embeddings {positions}); set sliding_window to null in "
                "config.json (or pass --hf-config-path) if the model was trained without it"
            )
        return {
            "num_experts": need("num_local_experts"),
            "num_experts_per_tok": need("num_experts_per_tok"),
            "moe_intermediate_size": need("intermediate_size"),
            "norm_topk_prob": True,  # Mixtral's softmax over the top-k logits: renormalised
        }
    return {}


def _gguf_rope_scaling(file: GGUFFile, arch: str) -> dict[str, Any] | None:
    for t in file.tensors:
        if t.name == "rope_freqs.weight":  # Llama 3.1+: llama3 scaling baked into divisors
            return {"rope_type": "freq_factors", "factors": [float(x) for x in t.data]}
    kind = file.metadata.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(file.metadata[f"{arch}.rope.scaling.factor"])}
    return {"rope_type": kind}  # rejected with a clear message by ModelConfig


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """config.json as a dict; `path` is the file or the folder holding it."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no config.json at {file}; pass a model folder or --hf-config-path")
    with open(file, encoding="utf-8") as fh:
        return json.load(fh)


def load_model_config(source: Any, hf_config_path: str | None = None) -> ModelConfig:
    """The ModelConfig of a ModelSource, without reading weights.

    `hf_config_path` (--hf-config-path) overrides where config.json comes from, for a
    folder or a GGUF file alike.
    """
    if hf_config_path is not None:
        return ModelConfig.from_hf_config(read_hf_config(hf_config_path))
    if source.kind == "gguf":
        from common.gguf_file import open_gguf

        return ModelConfig.from_gguf(open_gguf(source.path))
    return ModelConfig.from_hf_config(read_hf_config(source.path))
