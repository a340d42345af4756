"""The benchmarks behind `pdserve bench NAME` (pdserve/cli/bench.py lists them), one package
or module each: serve/, kernels/, decode_step/, transfer/, route_sim/ (`route`),
prefix_index, cpu_throughput, disagg_latency, tp_check, make_bench_model (`make-model`).
Each declares its flags in a module that imports no torch. Their shared helpers: trace
(Mooncake traces), stats (percentiles), table (Markdown and aligned tables), timing
(do_bench, CUDA graphs, the copy-bandwidth ceiling).
"""
