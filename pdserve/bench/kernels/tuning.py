"""`pdserve bench kernels --tune`: sweeps of kernel configs and decode split counts, the
data behind the kernels' defaults."""

from __future__ import annotations

import torch


class KernelTuning:
    """Mixed into KernelBench: uses its args, dtype, batch and time_ms."""

    def tune(self) -> None:
        """Print sweeps of kernel configs and split counts (the data behind the defaults)."""
        sections = set(self.args.tune_sections.split(","))
        if "decode" in sections:
            self.tune_decode_configs(None)
        if "decode-fp8" in sections:
            self.tune_decode_configs(torch.float8_e4m3fn)
        if "splits" in sections:
            self.tune_splits()
        for name, cache_dtype in (("prefill", None), ("prefill-fp8", torch.float8_e4m3fn)):
            if name in sections:
                self.tune_prefill(cache_dtype)

    def tune_decode_configs(self, cache_dtype) -> None:
        from common.attention.triton_decode import DecodeConfig, decode_attention

        print(
            f"\n## tune: decode configs ({cache_dtype or self.dtype} cache), block_n/warps/stages: µs",
            flush=True,
        )
        configs = [
            DecodeConfig(bn, w, s)
            for bn, w, s in [
                (64, 4, 3),
                (32, 4, 4),
                (128, 4, 3),
                (128, 4, 4),
                (256, 4, 3),
                (64, 8, 3),
                (128, 8, 3),
                (256, 8, 3),
                (64, 4, 5),
                (64, 2, 3),
            ]
        ]
        shapes = [(64, 4096), (256, 8192), (8, 2048), (1, 8192)]
        if self.args.smoke:
            configs, shapes = configs[:2], [(2, 40)]
        for batch_size, context in shapes:
            b = self.batch([1] * batch_size, [context] * batch_size, cache_dtype)
            line = []
            for cfg in configs:
                ms = self.time_ms(
                    lambda b=b, cfg=cfg: decode_attention(
                        b.query, b.kv_cache, 0, b.metadata, b.scale, b.k_scale, b.v_scale, config=cfg
                    )
                )
                line.append(f"{cfg.block_n}/{cfg.num_warps}/{cfg.num_stages}:{ms * 1e3:.1f}")
            print(f"B={batch_size} ctx={context}: " + "  ".join(line), flush=True)

    def tune_splits(self) -> None:
        from common.attention.triton_decode import decode_attention

        print("\n## tune: decode split counts (bf16 cache), splits: µs", flush=True)
        shapes = [(1, 512), (1, 2048), (1, 8192), (8, 512), (8, 2048), (8, 8192), (64, 512), (64, 4096)]
        for batch_size, context in [(1, 200)] if self.args.smoke else shapes:
            b = self.batch([1] * batch_size, [context] * batch_size, None)
            line = []
            for splits in (1, 2, 4, 8, 16, 32, 64):
                if splits * (16 if self.args.smoke else 64) > context:
                    break
                ms = self.time_ms(
                    lambda b=b, s=splits: decode_attention(
                        b.query, b.kv_cache, 0, b.metadata, b.scale, num_splits=s
                    )
                )
                line.append(f"{splits}:{ms * 1e3:.1f}")
            print(f"B={batch_size} ctx={context}: " + "  ".join(line), flush=True)

    def tune_prefill(self, cache_dtype) -> None:
        from common.attention.triton_prefill import PrefillConfig, prefill_attention

        a = self.args
        print(
            f"\n## tune: prefill configs ({cache_dtype or self.dtype} cache), m/n/warps/stages: TFLOP/s",
            flush=True,
        )
        configs = [
            PrefillConfig(m, n, w, s)
            for m, n, w, s in [
                (128, 64, 8, 3),
                (128, 128, 8, 3),
                (128, 32, 4, 3),
                (128, 32, 4, 4),
                (128, 64, 4, 3),
                (128, 64, 4, 4),
                (64, 64, 4, 3),
                (64, 32, 4, 3),
                (128, 32, 8, 3),
                (128, 128, 8, 2),
                (256, 64, 8, 3),
                (256, 32, 8, 3),
            ]
        ]
        shapes = [(8, 2048, 0), (1, 2048, 6144), (1, 512, 3584)]
        if self.args.smoke:
            configs, shapes = [PrefillConfig(16, 16, 4, 1), PrefillConfig(32, 16, 4, 1)], [(1, 20, 7)]
        for reqs, new, prefix in shapes:
            b = self.batch([new] * reqs, [new + prefix] * reqs, cache_dtype)
            flops = 4 * a.head_dim * a.num_q_heads * reqs * (new * prefix + new * (new + 1) // 2)
            line = []
            for cfg in configs:
                label = f"{cfg.block_m}/{cfg.block_n}/{cfg.num_warps}/{cfg.num_stages}"
                try:
                    ms = self.time_ms(
                        lambda b=b, cfg=cfg: prefill_attention(
                            b.query, b.kv_cache, 0, b.metadata, b.scale, b.k_scale, b.v_scale, config=cfg
                        )
                    )
                    line.append(f"{label}:{flops / ms / 1e9:.0f}")
                except Exception as exc:  # a config that does not fit (shared memory) is reported, not fatal
                    line.append(f"{label}:{type(exc).__name__}")
            print(f"{reqs}x{new}+{prefix}: " + "  ".join(line), flush=True)
