"""The baseline of `pdserve bench kernels`: torch's flash-attention kernel on the same
problem laid out contiguously, checked against our output and timed the same way."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.attention.paged_batch import PagedBatch, relative_error
from pdserve.bench.kernels.report import TOLERANCE


class SdpaBaseline:
    """Mixed into KernelBench: uses its args, device, dtype and time_ms."""

    def contiguous_kv(self, b: PagedBatch, num_reqs: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each request's K and V as contiguous [reqs, Hkv, seq_len, D] in the query dtype."""
        from common.attention.reference import gather_context

        out = []
        for kv, scale in ((0, b.k_scale), (1, b.v_scale)):
            t = torch.empty(
                (num_reqs, self.args.num_kv_heads, seq_len, self.args.head_dim),
                dtype=self.dtype,
                device=self.device,
            )
            for i in range(num_reqs):
                t[i] = (
                    gather_context(b.kv_cache, 0, b.metadata.block_tables[i], seq_len, kv).float() * scale
                ).to(self.dtype)
            out.append(t)
        return out[0], out[1]

    def flash(self, q, k, v, causal: bool) -> torch.Tensor:
        """torch's flash-attention kernel ([B, H, L, D] views); causal is bottom-right aligned."""
        if self.device.type == "cuda":
            return torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, causal, False, scale=self.args.head_dim**-0.5
            )[0]
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q.shape[2], k.shape[2]) if causal else None
        if k.shape[1] != q.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.args.head_dim**-0.5)

    def sdpa_decode(self, b: PagedBatch, ours: torch.Tensor) -> tuple[float | None, list[str]]:
        """Decode as flash sees it: per (sequence, KV head), the G query heads are G query rows."""
        batch_size, context = len(b.metadata.seq_lens_cpu), b.metadata.max_seq_len
        a = self.args
        k, v = self.contiguous_kv(b, batch_size, context)
        group = a.num_q_heads // a.num_kv_heads
        q = b.query.view(batch_size, a.num_kv_heads, group, a.head_dim)
        try:
            got = self.flash(q, k, v, causal=False).reshape(batch_size, a.num_q_heads, a.head_dim)
        except RuntimeError as exc:
            return None, [f"sdpa flash unavailable: {str(exc).splitlines()[0][:80]}"]
        notes = []
        err = relative_error(got, ours.float())
        if err > 2 * TOLERANCE:
            notes.append(f"sdpa differs from ours by {err:.1e}")
        if b.kv_cache.dtype != self.dtype:
            notes.append("sdpa reads a bf16 copy")
        ms = self.time_ms(lambda: self.flash(q, k, v, causal=False))
        return ms, notes

    def sdpa_prefill(self, b: PagedBatch, reqs: int, new: int, prefix: int, ours: torch.Tensor):
        a = self.args
        k, v = self.contiguous_kv(b, reqs, new + prefix)
        q = b.query.view(reqs, new, a.num_q_heads, a.head_dim).transpose(1, 2)
        notes = []
        try:
            got = self.flash(q, k, v, causal=True)
        except RuntimeError:  # no native GQA: give flash the KV heads repeated
            k = k.repeat_interleave(a.num_q_heads // a.num_kv_heads, 1)
            v = v.repeat_interleave(a.num_q_heads // a.num_kv_heads, 1)
            notes.append("sdpa on repeated KV heads")
            got = self.flash(q, k, v, causal=True)
        err = relative_error(got.transpose(1, 2).reshape_as(ours), ours.float())
        if err > 2 * TOLERANCE:
            notes.append(f"sdpa differs from ours by {err:.1e}")
        ms = self.time_ms(lambda: self.flash(q, k, v, causal=True))
        return ms, notes
