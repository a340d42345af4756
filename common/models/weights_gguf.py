"""Weights of a GGUF file, dequantized to float32 and renamed to Hugging Face names.

llama.cpp's converter permutes the rows of attn_q / attn_k of llama-architecture models
(to interleave the rotary pairs); this module undoes that, giving the Hugging Face
weights exactly. qwen2/qwen3 files are stored unpermuted.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping

import numpy as np
import torch
from gguf.quants import dequantize

from common.gguf_file import GGUFFile
from common.models.config import ModelConfig
from common.models.gguf_int4 import PACKABLE_TYPES, PackedInt4Weight, concat_rows, int4_parts
from common.models.weights_shard import Shard

_PERMUTED_ARCHITECTURES = ("llama", "mistral")
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Folded into ModelConfig.rope_scaling, not a weight.
_CONFIG_TENSORS = ("rope_freqs.weight",)


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor; an unknown name is returned unchanged."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_TENSOR.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return gguf_name


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of the rotary halves in a q/k projection."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_gguf_weights(
    reader: GGUFFile,
    config: ModelConfig,
    shards: Mapping[str, Shard] | None = None,
    skip: Collection[str] = (),
) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 CPU tensor) for every weight of the file but those named
    in `skip` (kept quantized instead); a tensor named in `shards` comes as that slice only
    (a tensor-parallel rank's part).

    A row slice is cut from the stored (quantized) rows before dequantizing, so a rank
    dequantizes only its rows; quantization blocks run along a row, and the q/k
    permutation stays inside a head, so whole heads slice cleanly.
    """
    permuted = config.extra.get("gguf_architecture") in _PERMUTED_ARCHITECTURES
    shards = shards or {}
    for tensor in reader.tensors:
        if tensor.name in _CONFIG_TENSORS:
            continue
        name = hf_name(tensor.name)
        if name in skip:
            continue
        shard = shards.get(name)
        data = tensor.data
        if shard is not None and shard.dim == 0:
            data = data[shard.start : shard.stop]
        w = dequantize(data, tensor.tensor_type)
        if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute_rows(w, w.shape[0] // config.head_dim)
        if shard is not None and shard.dim == 1:
            w = w[:, shard.start : shard.stop]
        # np.array copies: the reader's arrays are read-only views of the mapped file.
        yield name, torch.from_numpy(np.array(w, dtype=np.float32))


def pack_gguf_linears(model, reader: GGUFFile, config: ModelConfig) -> set[str]:
    """Keep every matmul weight of `model` whose tensors are all Q4_0, Q4_1 or Q8_0 blocks
    quantized (common/models/gguf_int4.py); the names of the tensors taken, which need no
    dense copy. A tied LM head is packed from the embedding, which still loads densely for
    the token lookup. Weights of other block types are left to the dense path."""
    tensors = {hf_name(t.name): t for t in reader.tensors}
    permuted = config.extra.get("gguf_architecture") in _PERMUTED_ARCHITECTURES
    taken: set[str] = set()
    for _role, module, names in model.linear_sources():
        stored = [tensors.get(name) for name in names]
        if any(t is None for t in stored) or len({t.tensor_type for t in stored}) != 1:
            continue
        if stored[0].tensor_type not in PACKABLE_TYPES:
            continue
        parts = []
        for name, tensor in zip(names, stored, strict=True):
            raw = tensor.data
            if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
                raw = unpermute_rows(raw, raw.shape[0] // config.head_dim)
            parts.append(int4_parts(np.asarray(raw), tensor.tensor_type))
        packed = PackedInt4Weight(concat_rows(parts))
        dense = model.lm_head if module is None else module.weight
        if (packed.out_features, packed.in_features) != tuple(dense.shape):
            raise ValueError(
                f"{', '.join(names)} hold {packed.out_features}x{packed.in_features} weights, the config "
                f"needs {tuple(dense.shape)}; the GGUF file and its config do not belong together"
            )
        if module is not None:
            module.keep_packed(packed)
            taken.update(names)
        else:
            model.lm_head_packed = packed
            if not config.tie_word_embeddings:
                model.lm_head = torch.nn.Parameter(
                    dense.new_zeros(()).expand(dense.shape), requires_grad=False
                )
                taken.update(names)
    return taken
