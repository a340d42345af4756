"""What both worker roles share: the ZMQ serving loop around an LLMEngine
(engine_server.py), load reports, worker metrics, the worker flags, and starting and
stopping a worker (run_worker.py). A worker is this loop plus one Role (role.py), which
brings the role's connector and its KV-transfer hooks."""
