"""The one harness for tests that start real pdserve processes: `stack` starts workers,
routers and `pdserve serve` and stops them; `worker_client` speaks the worker protocol as
a router does; `faults` adds what the fault tests need (streams watched from a thread,
router metrics by worker); `torch_free` checks that a module imports without torch."""
