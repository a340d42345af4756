"""`pdserve bench prefill`: time to first token of a prompt on the engine, against its
compute floor.

The engine (LLMEngine with the real scheduler, so a long prompt is chunked at
--max-num-batched-tokens as serving chunks it) gets one prompt of L tokens, or B prompts
at once; the figure is the wall time from adding them to the last first token, CUDA
synchronised at both ends, median of --repeats runs after --warmup runs of the same
shape (fresh random prompts each time, so the prefix cache never hits).

Its floor is the prefill's FLOPs (pdserve/bench/model_costs.py, ModelCosts.prefill_flops)
at the dense matmul rate measured in the same run (torch.mm at --matmul-size cubed, best
of --matmul-tries; with `-q fp8` the fp8 linears' FLOPs at torch._scaled_mm's measured
rate instead); MFU is the floor over the time. A mixture-of-experts token counts its router
and its k experts. `--profile` runs torch.profiler over one prefill and groups its kernels
into matmul, attention, norm+rope+act and other.

command.py (flags, entry; torch-free to import), engine_prefill.py (the engine and the
timed prefills), kernel_groups.py (--profile), report.py (rows and the table).
"""
