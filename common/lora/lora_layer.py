"""LoRA on the model's linear layers: per-slot stacked weights, and the step's LoRABatch.

`attach_lora(model, ...)` gives each of the decoder's fused linear layers (qkv, o,
gate_up, down) a LinearLoRA as its `lora` attribute; Linear.forward (and a
tensor-parallel rank's RowParallelLinear, before its all-reduce) then adds the step's
LoRA products to the base layer's output. A model without LoRA keeps `lora = None`, and
a step with no adapter sets no batch, so the base path does not change.

Tensor parallelism shards each adapter as its base layer: a column-parallel layer
(qkv, gate_up) keeps the whole A and its own rows of B; a row-parallel one (o, down) its
own columns of A and the whole B, and its partial product joins the base layer's partial
sum in the same all-reduce (x_r A_r^T summed over ranks is x A^T).
"""

from __future__ import annotations

import torch

from common.lora import lora_ops
from common.lora.lora_ops import LoRABatch
from common.lora.peft_adapter import PeftAdapter

_triton_ops = None  # common.lora.lora_ops_triton once imported; False where it cannot be


def _ops_for(x: torch.Tensor):
    """The Triton ops on CUDA when they import, else the torch reference."""
    global _triton_ops
    if not x.is_cuda:
        return lora_ops
    if _triton_ops is None:
        try:
            from common.lora import lora_ops_triton as module
        except ImportError:
            module = False
        _triton_ops = module
    return _triton_ops or lora_ops


def triton_ops_available() -> bool:
    """Whether CUDA steps can run LoRA with the Triton kernels (needed under CUDA graphs)."""
    return _ops_for(torch.empty(0, device="cuda")) is not lora_ops if torch.cuda.is_available() else False


class LoRAContext:
    """The current step's LoRABatch, shared by every LinearLoRA of one model; None while
    the step runs no adapter."""

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None


class LinearLoRA:
    """The adapters of one fused linear layer, stacked by slot (common/lora/lora_ops.py
    says the layout). `modules`: the Hugging Face names of its output bands, in order;
    `bands`: their row boundaries in this rank's output; `shards`: per module, the
    (dim, start, stop) of the full weight this rank holds, or None for the whole."""

    def __init__(
        self,
        context: LoRAContext,
        layer_index: int,
        modules: tuple[str, ...],
        bands: tuple[int, ...],
        in_features: int,
        shards: dict[str, tuple[int, int, int] | None],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.context = context
        self.layer_index = layer_index
        self.modules = modules
        self.bands = bands
        self.shards = shards
        n = len(modules)
        self.a = torch.zeros(num_slots, n * max_rank, in_features, dtype=dtype, device=device)
        self.b = torch.zeros(num_slots, bands[-1], max_rank, dtype=dtype, device=device)
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.present = [False] * num_slots  # whether the slot's adapter adapts this layer

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the base layer's output for x) plus the step's LoRA products, in place."""
        batch = self.context.batch
        if batch is None or x.shape[0] != batch.num_tokens:
            return y
        ops = _ops_for(x)
        if ops is lora_ops:  # the host loop skips the slots that do not adapt this layer
            groups = [g for g in batch.groups if self.present[g[0]]]
            if not groups:
                return y
            batch = LoRABatch(batch.token_slots, batch.sorted_tokens, batch.slot_starts, groups)
        shrunk = ops.lora_shrink(x, self.a, batch, len(self.modules))
        ops.lora_expand_add(y, shrunk, self.b, self.scales, self.bands, batch)
        return y

    @torch.no_grad()
    def set_slot(self, slot: int, adapter: PeftAdapter | None) -> None:
        """Put `adapter`'s weights for this layer in `slot` (zeros where it does not adapt
        a module; all zeros for None)."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        max_rank = self.b.shape[2]
        present = False
        for j, module in enumerate(self.modules):
            pair = None if adapter is None else adapter.weights.get((self.layer_index, module))
            if pair is None:
                continue
            a, b = self._shard(module, *pair)
            rank = a.shape[0]
            self.a[slot, j * max_rank : j * max_rank + rank].copy_(a, non_blocking=True)
            self.b[slot, self.bands[j] : self.bands[j + 1], :rank].copy_(b, non_blocking=True)
            present = True
        self.scales[slot] = adapter.scaling if adapter is not None else 0.0
        self.present[slot] = present

    def _shard(self, module: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shard = self.shards.get(module)
        if shard is None:
            return a, b
        dim, start, stop = shard
        if dim == 0:  # column-parallel: this rank's output rows of B
            return a, b[start:stop]
        return a[:, start:stop], b  # row-parallel: this rank's input columns of A


def attach_lora(
    model, num_slots: int, max_rank: int, dtype: torch.dtype
) -> tuple[LoRAContext, list[LinearLoRA]]:
    """Give every decoder layer's qkv, o, gate_up and down projections a LinearLoRA of
    `num_slots` slots; (the shared context, every LinearLoRA in layer order)."""
    if model.config.num_experts:
        raise ValueError(
            f"--enable-lora: LoRA adapters on a mixture-of-experts model ({model.config.architecture}) "
            "are not supported; serve it without --enable-lora"
        )
    context = LoRAContext()
    device = next(model.parameters()).device
    full_shards = model.weight_shards() if hasattr(model, "weight_shards") else {}
    layers: list[LinearLoRA] = []
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        q, kv, n = attn.q_size, attn.kv_size, mlp.intermediate_size
        plan = (
            (attn.qkv_proj, "self_attn", ("q_proj", "k_proj", "v_proj"), (0, q, q + kv, q + 2 * kv)),
            (attn.o_proj, "self_attn", ("o_proj",), (0, attn.o_proj.weight.shape[0])),
            (mlp.gate_up_proj, "mlp", ("gate_proj", "up_proj"), (0, n, 2 * n)),
            (mlp.down_proj, "mlp", ("down_proj",), (0, mlp.down_proj.weight.shape[0])),
        )
        for linear, block, modules, bands in plan:
            shards = {}
            for module in modules:
                shard = full_shards.get(f"model.layers.{i}.{block}.{module}.weight")
                shards[module] = None if shard is None else (shard.dim, shard.start, shard.stop)
            lora = LinearLoRA(
                context, i, modules, bands, linear.weight.shape[1], shards, num_slots, max_rank, dtype, device
            )
            linear.lora = lora
            layers.append(lora)
    return context, layers


def detach_lora(model) -> None:
    """Take the LoRA layers off `model` (a model shared between engines)."""
    for layer in model.layers:
        for linear in (
            layer.self_attn.qkv_proj,
            layer.self_attn.o_proj,
            layer.mlp.gate_up_proj,
            layer.mlp.down_proj,
        ):
            linear.lora = None
