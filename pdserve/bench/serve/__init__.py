"""`pdserve bench serve`: a streaming client that loads an OpenAI-compatible server and
reports TTFT, TPOT, ITL and E2EL percentiles, throughput and goodput, as `vllm bench serve`.

One idea a module: text_tokenizer (counting tokens locally or through the server),
prompt_builder (prompts of exact token counts), datasets (what to send), arrivals
(when), client (one timed streamed request), runner (all of them on schedule), metrics
(the figures), kv_pulls (the decode workers' KV pulls, from their /metrics), report
(table and JSON), plots (PNG charts), progress (the bar), command (the CLI). Torch-free.
"""
