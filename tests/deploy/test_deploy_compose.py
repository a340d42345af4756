"""The one-host pieces of deploy/: the compose file against the vendored compose-spec
schema, the Prometheus scrape configuration against the compose services, and the
Containerfile against the repository."""

from __future__ import annotations

import re
import subprocess

import tomllib
import yaml

from tests.deploy.deploy_files import (
    COMPOSE_FILE,
    DEPLOY,
    KUSTOMIZE_DIRS,
    REPO,
    SCHEMAS,
    compose_invocations,
    load_compose,
    pod_specs,
    render,
    tool,
)

COMPOSE_SCHEMA = SCHEMAS / "compose-spec.json"


def check_compose(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("check-jsonschema"), "--schemafile", str(COMPOSE_SCHEMA), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_file_matches_the_compose_spec():
    result = check_compose(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_spec_schema_rejects_a_broken_compose_file(tmp_path):
    compose = load_compose()
    compose["services"]["router"]["comand"] = ["router"]  # misspelled key
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(compose))
    assert check_compose(broken).returncode == 1


def test_compose_runs_redis_workers_router_and_monitoring():
    services = load_compose()["services"]
    assert {"redis", "prefill", "decode", "router", "prometheus", "grafana"} <= set(services)
    for worker in ("prefill", "decode"):
        service = services[worker]
        # the name others dial is the hostname the worker advertises in the registry
        assert service["hostname"] == worker
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    mounts = {v.split(":")[0] for v in services["grafana"]["volumes"]}
    for mount in mounts:
        assert (DEPLOY / mount).resolve().is_dir(), mount


def _metrics_port(argv: list[str]) -> int:
    (port,) = [a.split("=", 1)[1] for a in argv if a.startswith("--metrics-port=") or a.startswith("--port=")]
    return int(port)


def test_prometheus_scrapes_every_pdserve_service_on_its_metrics_port():
    config = yaml.safe_load((DEPLOY / "monitoring" / "prometheus.yml").read_text())
    scraped = {}
    for job in config["scrape_configs"]:
        for sd in job["dns_sd_configs"]:
            for name in sd["names"]:
                scraped[name] = sd["port"]
        (relabel,) = job["relabel_configs"]
        assert relabel["target_label"] == "component"
    expected = {inv.where.split()[-1]: _metrics_port(inv.argv) for inv in compose_invocations(load_compose())}
    assert scraped == expected


def test_containerfile_copies_every_package_pyproject_installs():
    text = (DEPLOY / "Containerfile").read_text()
    sources = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    copied = {src for group in sources for src in group}
    for src in copied:
        assert (REPO / src).exists(), f"the Containerfile copies {src}, which the repository lacks"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied
    assert "gpu" in pyproject["project"]["optional-dependencies"]
    assert re.search(r'pip install "\.\[gpu\]"', text)
    ignore = (DEPLOY / "Containerfile.dockerignore").read_text().splitlines()
    assert {f"!{src}" for src in copied} <= set(ignore), "the build context must include what is copied"


def test_container_exposes_the_ports_the_deployments_use():
    exposed = set()
    for line in (DEPLOY / "Containerfile").read_text().splitlines():
        if line.startswith("EXPOSE "):
            exposed |= {int(p) for p in line.split()[1:]}
    for obj in render(KUSTOMIZE_DIRS["base"]):
        for where, spec in pod_specs(obj):
            for container in spec["containers"]:
                if container["image"].startswith("pdserve"):
                    ports = {p["containerPort"] for p in container.get("ports", [])}
                    assert ports <= exposed, where
