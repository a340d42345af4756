"""Routing: weighted scorers rate the candidate workers and a picker takes the best; and
the decision whether a decode worker prefills a prompt itself. Torch-free."""

from router.policy.disaggregation import DEFAULT_LOCAL_PREFILL_THRESHOLD, should_prefill_locally
from router.policy.estimated_ttft import EstimatedTTFTScorer
from router.policy.kv_usage import KVUsageScorer
from router.policy.load_cost import LoadCostScorer
from router.policy.lora_affinity import LoRAAffinityScorer
from router.policy.picker import MaxScorePicker
from router.policy.prefix_overlap import PrefixOverlapScorer
from router.policy.queued_prefill import QueuedPrefillScorer
from router.policy.request_view import RequestView
from router.policy.routing_policy import NoWorkerAvailable, PolicyWeights, RoutingDecision, RoutingPolicy
from router.policy.running_requests import RunningRequestsScorer
from router.policy.scorer import Scorer, lower_is_better

__all__ = [
    "DEFAULT_LOCAL_PREFILL_THRESHOLD",
    "EstimatedTTFTScorer",
    "KVUsageScorer",
    "LoRAAffinityScorer",
    "LoadCostScorer",
    "MaxScorePicker",
    "NoWorkerAvailable",
    "PolicyWeights",
    "PrefixOverlapScorer",
    "QueuedPrefillScorer",
    "RequestView",
    "RoutingDecision",
    "RoutingPolicy",
    "RunningRequestsScorer",
    "Scorer",
    "lower_is_better",
    "should_prefill_locally",
]
