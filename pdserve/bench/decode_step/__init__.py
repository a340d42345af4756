"""`pdserve bench decode-step`: one whole-model decode step against its memory floor.

A decode step reads every weight once (the embedding table excepted: only the batch's rows)
and each sequence's K/V once, and at small batch does little arithmetic, so its floor is

    (bytes of weights read + bytes of K/V read) / device-to-device copy bandwidth,

the copy bandwidth measured in the same run (bytes read + written per second). The bytes
are pdserve/bench/model_costs.py's: fp8 linears (`-q fp8`) at a byte a weight and a scale a
row; a mixture-of-experts model's experts as many as the batch's tokens touch under uniform
routing (k a layer at batch 1), with the floor of reading every expert and the count its
tokens really picked (moe_routing.py) beside it. For each
batch size the bench times the CUDA-graph replay of one decode step (median of many, with
do_bench), the same forward launched eagerly, and the engine's whole step
(ModelRunner.execute: packing the inputs, replay, sampling, reading the tokens back), and
prints the ratio to the floor and tokens/s. Against it: transformers' `generate` on a
model of the same config and dtype on the same GPU (its decode tokens/s, prefill taken out).

`--variants` also times the graphs with cuBLAS for the small-batch matmuls and with the
plain torch layers (no Triton layer kernels at all), `--profile` prints the kernels of one
replay at the smallest batch, and `--gemv` times each weight shape's matmul at batch 1
alone, cuBLAS against the Triton small-M matmul: what explains a gap to the floor. With
`-q fp8`, `--fp8-small-m` picks how fp8 matmuls of at most 16 rows run (torch._scaled_mm, the
Triton small-M matmul's weight-only fp8 path, or both, the second as a column of graph replays).

Defaults: Llama-3-8B shapes (common/models/configs/llama-3-8b.json) with dummy weights,
bf16, batches 1 and 64 at context 1024. `--device cpu` runs the same code eagerly on a
tiny config, to check the command without a GPU.

command.py (flags, entry; torch-free to import), step_bench.py (the model, its batches,
the timed steps and the switch variants), moe_routing.py (the experts a step's tokens pick),
diagnostics.py (--gemv, --gemv-sweep, --profile), hf_baseline.py (transformers' generate),
report.py (rows and the table).
"""
