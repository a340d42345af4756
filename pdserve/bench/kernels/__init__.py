"""`pdserve bench kernels`: check each attention kernel against its reference, then time it.

For every shape it prints the median time, the achieved bandwidth (decode, write_kv) or
TFLOP/s (prefill), that figure as a fraction of the ceiling measured in the same run
(device-to-device copy bandwidth, counting bytes read and written; a bf16 8192³ matrix
product), and the time of a baseline on the equivalent contiguous problem: torch SDPA's
flash kernel for attention, the torch reference for write_kv. Times come from
triton.testing.do_bench (CUDA events, warm-up, L2 flushed before each run, median) over
CUDA-graph replays of each kernel and baseline, so host launch cost stays out.

Decode rows also time the chunked-prefill kernel on the same batch ("unified" rows): the
measurement behind serving decode with a kernel of its own.

Shapes default to Llama-3-8B attention: 32 query / 8 KV heads, head dim 128, block 16.
Only torch, triton and numpy are needed, so it runs on a bare GPU machine.

command.py (flags, entry; torch-free to import), kernel_bench.py (shapes, checks, timed
cases), sdpa_baseline.py (torch's flash kernel on the same problem), tuning.py (config
sweeps), report.py (rows and the table).
"""
