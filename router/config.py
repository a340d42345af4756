"""RouterConfig: everything the router process is told on its command line, in one place.

`pdserve router` fills it from its flags (router/cli.py); tests build it directly.
Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.block_hash import require_shared_hash_seed
from common.config.lora_config import LoRAConfig
from router.policy import DEFAULT_LOCAL_PREFILL_THRESHOLD, PolicyWeights

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# A worker that sent no load report for this long is taken out of routing (the
# workers report at least every second when idle; docs/disaggregation-flow.md).
DEFAULT_WORKER_HEALTH_TIMEOUT_S = 3.0
# The longest a request waits for its worker's next message; past it the request fails
# instead of hanging. Generous, since a CPU worker may queue a request behind long prefills.
DEFAULT_WORKER_REPLY_TIMEOUT_S = 300.0
# Requests in flight in the router (router/admission.py): None sizes it from the decode
# workers' --max-num-seqs; the queue behind it (None: as long as the in-flight limit), and
# the longest a queued request waits before 429.
DEFAULT_MAX_CONCURRENT_REQUESTS: int | None = None
DEFAULT_MAX_QUEUED_REQUESTS: int | None = None
DEFAULT_MAX_QUEUE_WAIT_S = 60.0
# vLLM's defaults for --h11-max-incomplete-event-size and --h11-max-header-count.
DEFAULT_MAX_EVENT_SIZE = 4 * 1024 * 1024
DEFAULT_MAX_HEADER_COUNT = 256
DEFAULT_HASH_ALGO = "sha256"
# Who may read /metrics and /health (with /ping): everyone, only holders of an --api-key,
# or (metrics only) nobody: the route answers 404. docs/security.md.
ENDPOINT_ACCESS = ("public", "api-key", "disabled")


@dataclass
class RouterConfig:
    prefill_workers: list[str] = field(default_factory=list)  # tcp://host:port of each
    decode_workers: list[str] = field(default_factory=list)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: str | list[str] | None = None  # one key, or several (any one is accepted)
    metrics_access: str = "public"  # one of ENDPOINT_ACCESS
    health_access: str = "public"  # "public" or "api-key"
    # the cluster secret (common/frame_auth.py): messages to and from workers are sealed
    cluster_secret: bytes | None = None
    enable_log_requests: bool = False  # log each request's prompt and parameters
    max_log_len: int | None = None  # most prompt characters a logged request shows; None: all
    local_prefill_threshold: int = DEFAULT_LOCAL_PREFILL_THRESHOLD
    # None: what the workers report (their LoadReports), else the default above
    block_size: int | None = None
    prefix_caching_hash_algo: str | None = None
    # defaults tuned with `pdserve bench route` (docs/routing.md)
    policy_weights: PolicyWeights = field(default_factory=PolicyWeights)
    worker_health_timeout_s: float = DEFAULT_WORKER_HEALTH_TIMEOUT_S
    worker_reply_timeout_s: float = DEFAULT_WORKER_REPLY_TIMEOUT_S
    max_concurrent_requests: int | None = DEFAULT_MAX_CONCURRENT_REQUESTS
    max_queued_requests: int | None = DEFAULT_MAX_QUEUED_REQUESTS
    max_queue_wait_s: float = DEFAULT_MAX_QUEUE_WAIT_S
    max_event_size: int = DEFAULT_MAX_EVENT_SIZE  # largest header block or body, in bytes
    max_header_count: int = DEFAULT_MAX_HEADER_COUNT
    enable_request_id_headers: bool = False
    router_id: str | None = None  # None: a random one
    # redis://HOST:PORT/DB of the worker registry (common/registry.py); None: static workers only
    registry: str | None = None
    registry_poll_interval_s: float = 1.0
    # --enable-lora, --lora-modules ...: the adapters served under their own model names
    # (router/lora_adapters.py); the workers' flags must allow them
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    # --allow-runtime-lora-updating (or $VLLM_ALLOW_RUNTIME_LORA_UPDATING): mount
    # /v1/load_lora_adapter and /v1/unload_lora_adapter
    allow_runtime_lora_updating: bool = False

    @property
    def api_keys(self) -> list[str]:
        """The accepted API keys; empty when none is required."""
        if not self.api_key:
            return []
        return [self.api_key] if isinstance(self.api_key, str) else list(self.api_key)

    def validate(self) -> None:
        """Raise ValueError naming the setting that is wrong and what to do."""
        for key in self.api_keys:
            if not key or key != key.strip() or any(c.isspace() for c in key):
                raise ValueError("an --api-key must be non-empty and hold no spaces (it is sent in a header)")
        if self.metrics_access not in ENDPOINT_ACCESS:
            raise ValueError(f"--metrics-access must be one of {', '.join(ENDPOINT_ACCESS)}, "
                             f"got {self.metrics_access!r}")  # fmt: skip
        if self.health_access not in ENDPOINT_ACCESS[:2]:
            raise ValueError(f"--health-access must be public or api-key, got {self.health_access!r}")
        if "api-key" in (self.metrics_access, self.health_access) and not self.api_keys:
            raise ValueError("--metrics-access/--health-access api-key needs --api-key (or $VLLM_API_KEY)")
        if self.max_log_len is not None and self.max_log_len < 0:
            raise ValueError(f"--max-log-len must be 0 or more, got {self.max_log_len}")
        if not self.decode_workers and not self.registry:
            raise ValueError(
                "no decode workers given; pass --decode-workers tcp://HOST:PORT[,tcp://HOST:PORT...] "
                "(the addresses the decode workers' --worker-address bind), or --registry "
                "redis://HOST:PORT/DB to find the workers in a Redis registry"
            )
        if self.registry:
            from common.registry import check_registry_url

            check_registry_url(self.registry)
            if self.registry_poll_interval_s <= 0:
                raise ValueError(
                    f"registry_poll_interval_s must be positive, got {self.registry_poll_interval_s}"
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
        if self.prefix_caching_hash_algo is not None:  # the router recomputes the workers' hashes
            require_shared_hash_seed(self.prefix_caching_hash_algo, self.cluster_secret, "router")
        for name in ("worker_health_timeout_s", "worker_reply_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_concurrent_requests is not None and self.max_concurrent_requests < 1:
            raise ValueError(
                f"--max-concurrent-requests must be at least 1, got {self.max_concurrent_requests}"
            )
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError(f"--max-queued-requests must be 0 or more, got {self.max_queued_requests}")
        if self.max_queue_wait_s <= 0:
            raise ValueError(f"--max-queue-wait must be more than 0 seconds, got {self.max_queue_wait_s}")
        self.lora.validate()
