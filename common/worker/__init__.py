"""What both worker roles share: the ZMQ serving loop around an LLMEngine
(engine_server.py), load reports, worker metrics, the worker flags, and starting and
stopping a worker (run_worker.py). The role packages (prefill_worker, decode_worker)
add only their KV-transfer side (worker_role.py)."""
