"""deploy/kubernetes renders and validates offline: every overlay through `kubectl
kustomize`, core objects through kubernetes-validate (strict), the CRD objects through
check-jsonschema against the schemas vendored in deploy/schemas."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.deploy_files import (
    CRD_SCHEMAS,
    KUBERNETES_VERSION,
    KUSTOMIZE_DIRS,
    pod_specs,
    render,
    tool,
)


def _kubernetes_validate():
    try:
        import kubernetes_validate as module
    except ModuleNotFoundError:
        raise AssertionError(
            "kubernetes-validate is not installed; pip install kubernetes-validate"
        ) from None
    return module


def validate_core(obj: dict[str, Any]) -> None:
    """Raises kubernetes_validate's ValidationError when `obj` is not a valid object."""
    _kubernetes_validate().validate(obj, KUBERNETES_VERSION, strict=True)


def check_jsonschema(
    schema: Path, objects: list[dict[str, Any]], tmp_path: Path
) -> subprocess.CompletedProcess:
    files = []
    for i, obj in enumerate(objects):
        path = tmp_path / f"{obj['kind']}-{i}.json"
        path.write_text(json.dumps(obj))
        files.append(str(path))
    return subprocess.run(
        [tool("check-jsonschema"), "--schemafile", str(schema), *files],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module", params=sorted(KUSTOMIZE_DIRS))
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(KUSTOMIZE_DIRS[request.param])


def kinds(objects: list[dict[str, Any]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for obj in objects:
        out.setdefault(obj["kind"], set()).add(obj["metadata"]["name"])
    return out


def test_every_overlay_renders_the_whole_stack(rendered):
    name, objects = rendered
    found = kinds(objects)
    workers = "LeaderWorkerSet" if name == "multi-node-tp" else "Deployment"
    assert {"pdserve-prefill", "pdserve-decode"} <= found[workers]
    assert {"pdserve-router", "pdserve-redis"} <= found["Deployment"]
    assert found["Service"] == {"pdserve-router", "pdserve-redis"}
    assert found["ServiceMonitor"] == {"pdserve-router"}
    assert found["PodMonitor"] == {"pdserve-workers"}
    if name != "base":
        assert all(o["metadata"].get("namespace") == "pdserve" for o in objects if o["kind"] != "Namespace")


def test_core_objects_pass_kubernetes_validate_strict(rendered):
    _, objects = rendered
    core = [o for o in objects if o["kind"] not in CRD_SCHEMAS]
    assert core
    for obj in core:
        validate_core(obj)


def test_crd_objects_match_the_vendored_schemas(rendered, tmp_path):
    _, objects = rendered
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        if obj["kind"] in CRD_SCHEMAS:
            by_kind.setdefault(obj["kind"], []).append(obj)
    assert {"ServiceMonitor", "PodMonitor"} <= set(by_kind)
    for kind, group in by_kind.items():
        result = check_jsonschema(CRD_SCHEMAS[kind], group, tmp_path)
        assert result.returncode == 0, f"{kind}:\n{result.stdout}\n{result.stderr}"


def test_leaderworkerset_pod_templates_are_valid_pod_templates(rendered):
    """The vendored LeaderWorkerSet schema leaves the pod templates to the core schema:
    each is validated as a v1 PodTemplate."""
    name, objects = rendered
    templates = [
        (where, spec) for obj in objects if obj["kind"] == "LeaderWorkerSet" for where, spec in pod_specs(obj)
    ]
    if name != "multi-node-tp":
        assert not templates
        return
    assert len(templates) == 4  # prefill and decode, leader and worker
    for _where, spec in templates:
        validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                       "template": {"spec": spec}})  # fmt: skip


def test_gpu_workers_request_gpus_and_expose_their_metrics_port(rendered):
    _, objects = rendered
    for obj in objects:
        component = obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        if component not in ("prefill", "decode"):
            continue
        for where, spec in pod_specs(obj):
            (container,) = spec["containers"]
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, where
            ports = {p["name"] for p in container.get("ports", [])}
            if "worker" in where and "leader" not in where:
                continue  # a headless rank serves no sockets of its own
            assert {"worker", "metrics"} <= ports, where
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in container, f"{where} has no {probe}"


# -- the validators do reject broken objects ---------------------------------------------------


def test_kubernetes_validate_rejects_a_misspelled_field():
    (deployment,) = [o for o in render(KUSTOMIZE_DIRS["base"]) if o["metadata"]["name"] == "pdserve-router"
                     and o["kind"] == "Deployment"]  # fmt: skip
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(_kubernetes_validate().ValidationError):
        validate_core(broken)


@pytest.mark.parametrize(
    ("kind", "break_it"),
    [
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(intervall="15s")),
        ("PodMonitor", lambda o: o["spec"]["podMetricsEndpoints"][0].update(interval="15 seconds")),
        ("LeaderWorkerSet", lambda o: o["spec"]["leaderWorkerTemplate"].update(restartPolicy="Always")),
    ],
)
def test_vendored_schemas_reject_a_broken_object(kind, break_it, tmp_path):
    (obj, *_) = [o for o in render(KUSTOMIZE_DIRS["multi-node-tp"]) if o["kind"] == kind]
    assert check_jsonschema(CRD_SCHEMAS[kind], [obj], tmp_path).returncode == 0
    broken = copy.deepcopy(obj)
    break_it(broken)
    result = check_jsonschema(CRD_SCHEMAS[kind], [broken], tmp_path)
    assert result.returncode == 1, result.stdout


def test_each_vendored_schema_is_for_its_kind():
    for kind, path in CRD_SCHEMAS.items():
        schema = json.loads(path.read_text())
        assert schema["$schema"].startswith("https://json-schema.org/")
        assert schema["properties"]["kind"]["const"] == kind
