"""RouterConfig: everything the router process is told on its command line, in one place.

`pdserve router` fills it from its flags (router/cli.py); tests build it directly.
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from router.policy import DEFAULT_LOCAL_PREFILL_THRESHOLD, PolicyWeights

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# A worker that sent no load report for this long is taken out of routing (the
# workers report at least every second when idle; docs/disaggregation-flow.md).
DEFAULT_WORKER_HEALTH_TIMEOUT_S = 3.0
# The longest a request waits for its worker's next message; past it the request fails
# instead of hanging. Generous, since a CPU worker may queue a request behind long prefills.
DEFAULT_WORKER_REPLY_TIMEOUT_S = 300.0
# Requests in flight in the router before new ones get 503 + Retry-After.
DEFAULT_MAX_CONCURRENT_REQUESTS = 1024
# vLLM's defaults for --h11-max-incomplete-event-size and --h11-max-header-count.
DEFAULT_MAX_EVENT_SIZE = 4 * 1024 * 1024
DEFAULT_MAX_HEADER_COUNT = 256
DEFAULT_BLOCK_SIZE = 16
DEFAULT_HASH_ALGO = "sha256"


@dataclass
class RouterConfig:
    prefill_workers: list[str] = field(default_factory=list)  # tcp://host:port of each
    decode_workers: list[str] = field(default_factory=list)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | None = None
    local_prefill_threshold: int = DEFAULT_LOCAL_PREFILL_THRESHOLD
    # None: what the workers report (LoadReport.extra), else the default above
    block_size: int | None = None
    prefix_caching_hash_algo: str | None = None
    policy_weights: PolicyWeights = field(default_factory=PolicyWeights)
    worker_health_timeout_s: float = DEFAULT_WORKER_HEALTH_TIMEOUT_S
    worker_reply_timeout_s: float = DEFAULT_WORKER_REPLY_TIMEOUT_S
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    max_event_size: int = DEFAULT_MAX_EVENT_SIZE  # largest header block or body, in bytes
    max_header_count: int = DEFAULT_MAX_HEADER_COUNT
    enable_request_id_headers: bool = False
    router_id: str | None = None  # None: a random one

    def validate(self) -> None:
        """Raise ValueError naming the setting that is wrong and what to do."""
        if not self.decode_workers:
            raise ValueError(
                "no decode workers given; pass --decode-workers tcp://HOST:PORT[,tcp://HOST:PORT...] "
                "(the addresses the decode workers' --worker-address bind)"
            )
        seen: set[str] = set()
        for address in [*self.prefill_workers, *self.decode_workers]:
            if not address.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(
                    f"worker address {address!r} must be a ZMQ address such as tcp://127.0.0.1:9100"
                )
            if "*" in address:
                raise ValueError(
                    f"worker address {address!r} is a bind address; give the address the router "
                    "connects to, e.g. tcp://10.0.0.5:9100"
                )
            if address in seen:
                raise ValueError(f"worker address {address} is given twice; each worker once")
            seen.add(address)
        if self.local_prefill_threshold < 0:
            raise ValueError(
                f"--local-prefill-threshold must be 0 or more tokens, got {self.local_prefill_threshold}"
            )
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"--block-size must be at least 1, got {self.block_size}")
        for name in ("worker_health_timeout_s", "worker_reply_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_concurrent_requests < 1:
            raise ValueError(
                f"--max-concurrent-requests must be at least 1, got {self.max_concurrent_requests}"
            )
