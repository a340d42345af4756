"""Every GPU worker a deployment runs keeps its compiled Triton kernels on a volume, so a
restarted worker loads them instead of compiling: the image points TRITON_CACHE_DIR at
/var/cache/pdserve/triton and owns that folder for the workers' user, every worker container
(compose service, Deployment, LeaderWorkerSet leader and rank pods) sets the same folder and
mounts a volume on it, and where pods are replaced the volume outlives them (a named compose
volume; the single-node overlay's folder on the node)."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

import pytest

from tests.deploy.deploy_files import DEPLOY, KUSTOMIZE_DIRS, load_compose, pod_specs, render

CACHE = PurePosixPath("/var/cache/pdserve/triton")


def worker_pods(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (where, spec)
        for obj in objects
        if obj["metadata"].get("labels", {}).get("app.kubernetes.io/component") in ("prefill", "decode")
        for where, spec in pod_specs(obj)
    ]


def cache_volume(spec: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The volume holding the container's TRITON_CACHE_DIR; fails the test if there is none."""
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("TRITON_CACHE_DIR") == str(CACHE), container["name"]
    mounts = [m for m in container.get("volumeMounts", []) if CACHE.is_relative_to(m["mountPath"])]
    assert len(mounts) == 1, f"{container['name']}: no volume mounted at or above {CACHE}"
    (volume,) = [v for v in spec["volumes"] if v["name"] == mounts[0]["name"]]
    return volume


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZE_DIRS))
def test_every_kubernetes_worker_keeps_its_kernels_on_a_volume(overlay):
    pods = worker_pods(render(KUSTOMIZE_DIRS[overlay]))
    assert len(pods) == (4 if overlay == "multi-node-tp" else 2)
    for where, spec in pods:
        (container,) = spec["containers"]
        volume = cache_volume(spec, container)
        assert set(volume) - {"name"} in ({"emptyDir"}, {"hostPath"}, {"persistentVolumeClaim"}), where


def test_the_single_node_overlay_keeps_the_kernels_on_the_node_across_pods():
    for where, spec in worker_pods(render(KUSTOMIZE_DIRS["single-gpu-node"])):
        volume = cache_volume(spec, spec["containers"][0])
        assert volume["hostPath"] == {"path": "/var/cache/pdserve", "type": "Directory"}, where
    header = (KUSTOMIZE_DIRS["single-gpu-node"] / "kustomization.yaml").read_text()
    assert "install -d -o 1000 -g 1000 /var/cache/pdserve" in header  # how the folder gets there


def test_compose_workers_share_a_named_kernel_cache_volume():
    compose = load_compose()
    for name in ("prefill", "decode"):
        service = compose["services"][name]
        assert service["environment"]["TRITON_CACHE_DIR"] == str(CACHE)
        assert "kernel-cache:/var/cache/pdserve" in service["volumes"], name
    assert "kernel-cache" in compose["volumes"]  # named: it outlives the containers


def test_the_image_points_triton_at_the_folder_and_lets_the_workers_write_it():
    containerfile = (DEPLOY / "Containerfile").read_text()
    assert re.search(rf"TRITON_CACHE_DIR={CACHE}\b", containerfile)
    assert re.search(r"chown -R 1000 [^\n]*/var/cache/pdserve", containerfile)
    assert "USER 1000" in containerfile
