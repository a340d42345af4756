"""Routing policies by name, for benchmarks that compare them (`pdserve bench route`).

- round_robin: ignore the cache and the load, take the workers in turn.
- least_loaded: fewest queued prefill tokens (ties: fewest requests, then KV blocks).
- longest_prefix: most cached leading blocks, ties to the least loaded; no load term,
  so a popular prefix keeps going where it is cached however long the queue there.
- prefix: the router's own policy, cache overlap weighed against load (PolicyWeights).
- adapter_blind: the router's policy with the LoRA-affinity weight 0, so that a LoRA
  workload shows what knowing where adapters are loaded is worth (LORA_POLICY_NAMES:
  replayed only on traces whose requests name adapters).
"""

from __future__ import annotations

from dataclasses import replace

from router.policy.picker import MaxScorePicker
from router.policy.prefix_overlap import PrefixOverlapScorer
from router.policy.queued_prefill import QueuedPrefillScorer
from router.policy.routing_policy import PolicyWeights, RoutingPolicy
from router.prefix_index import PrefixIndex

POLICY_NAMES = ("round_robin", "least_loaded", "longest_prefix", "prefix")
LORA_POLICY_NAMES = ("adapter_blind",)


def build_policy(
    name: str, prefix_index: PrefixIndex, block_size: int, weights: PolicyWeights | None = None
) -> RoutingPolicy:
    """The policy called `name`; `weights` apply to "prefix" only (default: the router's)."""
    # the baselines have no balance check and no pending-prefix claims
    plain = PolicyWeights(balance_threshold=0.0, pending_prefix_s=0.0)
    if name == "round_robin":
        picker = MaxScorePicker(prefer_least_loaded=False)
        return RoutingPolicy(None, block_size, plain, scorers=[], picker=picker)
    if name == "least_loaded":
        return RoutingPolicy(None, block_size, plain, scorers=[(QueuedPrefillScorer(), 1.0)])
    if name == "longest_prefix":
        return RoutingPolicy(prefix_index, block_size, plain, scorers=[(PrefixOverlapScorer(), 1.0)])
    if name == "prefix":
        return RoutingPolicy(prefix_index, block_size, weights=weights)
    if name == "adapter_blind":
        blind = replace(weights if weights is not None else PolicyWeights(), lora_affinity=0.0)
        return RoutingPolicy(prefix_index, block_size, weights=blind)
    known = ", ".join(POLICY_NAMES + LORA_POLICY_NAMES)
    raise ValueError(f"unknown routing policy {name!r}; choose one of {known}")
