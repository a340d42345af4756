"""How the router hashes a prompt for routing: as the workers do, salt included, and not
at all when it cannot compute the workers' hashes (xxhash without a shared seed)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from common.block_hash import install_cluster_hash_seed
from router.config import RouterConfig
from router.orchestrator import Orchestrator
from router.prefix_index import PrefixIndex, request_block_hashes

PROMPT = list(range(40))


def _orchestrator(algo: str, cluster_secret: bytes | None = None) -> Orchestrator:
    pool = SimpleNamespace(prefix_index=PrefixIndex(), block_size=8, hash_algo=algo)
    return Orchestrator(
        pool, RouterConfig(decode_workers=["tcp://127.0.0.1:9"], cluster_secret=cluster_secret)
    )


@pytest.fixture(autouse=True)
def no_shared_seed(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    yield
    install_cluster_hash_seed(None)


def test_prompts_are_hashed_with_the_workers_algo_and_salt():
    hashes = _orchestrator("sha256_cbor")._block_hashes(PROMPT, "tenant-a")
    assert hashes == request_block_hashes(PROMPT, 8, "sha256_cbor", "tenant-a") and len(hashes) == 5


def test_xxhash_learned_from_workers_without_a_shared_seed_routes_without_prefixes(caplog):
    orchestrator = _orchestrator("xxhash")
    with caplog.at_level(logging.WARNING, logger="router.orchestrator"):
        assert orchestrator._block_hashes(PROMPT, None) == []
        assert orchestrator._block_hashes(PROMPT, None) == []
    warnings = [r for r in caplog.records if "no seed shared" in r.getMessage()]
    assert len(warnings) == 1  # said once, not per request


def test_xxhash_with_the_cluster_secret_hashes_as_a_worker_holding_it_does():
    secret = b"the cluster secret, 32 bytes...."
    hashes = _orchestrator("xxhash", cluster_secret=secret)._block_hashes(PROMPT, None)
    assert len(hashes) == 5
    install_cluster_hash_seed(secret)  # what a worker holding the same secret does at startup
    assert hashes == request_block_hashes(PROMPT, 8, "xxhash")
    install_cluster_hash_seed(b"another secret of 32 bytes......")
    assert hashes != request_block_hashes(PROMPT, 8, "xxhash")
