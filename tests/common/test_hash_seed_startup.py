"""A router or worker told to hash blocks with xxhash and given no seed shared by the
cluster refuses to start, saying why and what to set; with a shared seed it goes on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from router.config import RouterConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
WHY = "the router could never recompute the workers' block hashes"


def _pdserve(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHASHSEED", "PDSERVE_CLUSTER_SECRET")}
    env.pop("PDSERVE_CLUSTER_SECRET_FILE", None)
    return subprocess.run(
        [sys.executable, "-m", "pdserve.cli.main", *argv],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_router_with_xxhash_and_no_shared_seed_exits_with_the_reason():
    done = _pdserve("router", "--decode-workers", "tcp://127.0.0.1:9", "--prefix-caching-hash-algo", "xxhash")
    assert done.returncode == 1  # the router's code for a setting it refuses
    assert "pdserve router: --prefix-caching-hash-algo xxhash needs a seed shared" in done.stderr
    assert WHY in done.stderr and "PYTHONHASHSEED" in done.stderr and "--cluster-secret-file" in done.stderr


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_worker_with_xxhash_and_no_shared_seed_exits_with_the_reason_before_loading(role):
    done = _pdserve(role, "--prefix-caching-hash-algo", "xxhash_cbor", "--model", "/nonexistent/model")
    assert done.returncode == 2  # a configuration error, found before the (missing) model is looked at
    assert f"pdserve {role}: --prefix-caching-hash-algo xxhash_cbor needs a seed shared" in done.stderr
    assert f"this {role} worker has none" in done.stderr and WHY in done.stderr


def test_a_router_with_xxhash_and_a_cluster_secret_or_pythonhashseed_is_accepted(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    base = dict(decode_workers=["tcp://127.0.0.1:9"], prefix_caching_hash_algo="xxhash")
    RouterConfig(**base, cluster_secret=b"s" * 32).validate()
    with pytest.raises(ValueError, match="needs a seed shared"):
        RouterConfig(**base).validate()
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    RouterConfig(**base).validate()


def test_a_router_with_a_cryptographic_algo_needs_no_seed(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    for algo in ("sha256", "sha256_cbor", None):
        RouterConfig(decode_workers=["tcp://127.0.0.1:9"], prefix_caching_hash_algo=algo).validate()
