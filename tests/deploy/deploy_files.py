"""What the deploy tests read: the rendered Kubernetes overlays, the compose file, the
dashboard, and every `pdserve ...` command line they contain."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUSTOMIZE_DIRS = {
    "base": DEPLOY / "kubernetes" / "base",
    "single-gpu-node": DEPLOY / "kubernetes" / "overlays" / "single-gpu-node",
    "multi-node-tp": DEPLOY / "kubernetes" / "overlays" / "multi-node-tp",
}
COMPOSE_FILE = DEPLOY / "compose.yaml"
DASHBOARD_FILE = DEPLOY / "monitoring" / "grafana" / "dashboards" / "pdserve.json"
SCHEMAS = DEPLOY / "schemas"
# kind -> the vendored schema its objects are checked against (the CRDs kubernetes-validate lacks)
CRD_SCHEMAS = {
    "ServiceMonitor": SCHEMAS / "monitoring.coreos.com_servicemonitor_v1.json",
    "PodMonitor": SCHEMAS / "monitoring.coreos.com_podmonitor_v1.json",
    "LeaderWorkerSet": SCHEMAS / "leaderworkerset.x-k8s.io_leaderworkerset_v1.json",
}
# The Kubernetes release the core objects are validated against: the oldest one the
# manifests claim to work on (docs/deployment.md).
KUBERNETES_VERSION = "1.29.0"
# Values the kubelet or the LeaderWorkerSet controller puts in the environment, for
# expanding $(VAR) in container args the way the kubelet does.
POD_ENV = {
    "POD_IP": "10.1.2.3",
    "POD_NAME": "pdserve-decode-7d9f8-abcde",
    "LWS_LEADER_ADDRESS": "pdserve-decode-0.pdserve-decode.pdserve",
    "LWS_GROUP_SIZE": "2",
    "LWS_WORKER_INDEX": "1",
}


def tool(name: str) -> str:
    """The path of a command-line tool the deploy tests need; fails saying how to get it."""
    path = shutil.which(name)
    if path is None:
        raise AssertionError(
            f"`{name}` is not on PATH; the deploy tests need it "
            "(kubectl: apt/gcloud package; kubernetes-validate, check-jsonschema: pip install)"
        )
    return path


def render(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIRECTORY` as a list of objects (fresh ones on every call)."""
    return [doc for doc in yaml.safe_load_all(_kustomize(directory)) if doc]


@functools.cache
def _kustomize(directory: Path) -> str:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return result.stdout


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@dataclass(frozen=True)
class Invocation:
    """One `pdserve ARGS...` a deployment runs: where it comes from and its argv."""

    where: str
    argv: list[str]

    @property
    def command(self) -> str:
        return self.argv[0]


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, pod spec) of every pod template an object carries."""
    spec = obj.get("spec", {})
    name = f"{obj['kind']}/{obj['metadata']['name']}"
    if "template" in spec:
        yield name, spec["template"]["spec"]
    lws = spec.get("leaderWorkerTemplate")
    if lws:
        if "leaderTemplate" in lws:
            yield f"{name} leader", lws["leaderTemplate"]["spec"]
        yield f"{name} worker", lws["workerTemplate"]["spec"]


def _kubelet_expand(arg: str, env: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in env, f"$({name}) is used in args but not defined in the container's env"
        return env[name]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, arg)


def kubernetes_invocations(objects: list[dict[str, Any]]) -> list[Invocation]:
    found = []
    for obj in objects:
        for where, spec in pod_specs(obj):
            for container in spec.get("containers", []):
                if not container["image"].split(":")[0].endswith("pdserve"):
                    continue
                env = {e["name"]: POD_ENV.get(e["name"], "x") for e in container.get("env", [])}
                if where.startswith("LeaderWorkerSet"):  # the controller injects these
                    env.update({k: v for k, v in POD_ENV.items() if k.startswith("LWS_")})
                argv = [_kubelet_expand(a, env) for a in container.get("command", []) + container["args"]]
                found.append(Invocation(f"{where} container {container['name']}", argv))
    return found


def _compose_expand(arg: str) -> str:
    """${VAR:-default} as compose interpolates it with VAR unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", lambda m: m.group(1), arg)


def compose_invocations(compose: dict[str, Any]) -> list[Invocation]:
    return [
        Invocation(f"compose service {name}", [_compose_expand(a) for a in service["command"]])
        for name, service in compose["services"].items()
        if service.get("image", "").split(":")[0] == "pdserve"
    ]
