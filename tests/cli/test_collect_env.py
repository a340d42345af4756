"""`pdserve collect-env`: text and --json, with everything installed and with nothing."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import torch

from tests.harness.stack import REPO

SECTIONS = ["system", "python", "packages", "torch", "cuda", "gpus", "nixl", "ucx", "environment"]


def collect_env(*args: str, python: list[str] | None = None, env: dict | None = None):
    command = [*(python or [sys.executable, "-m", "pdserve.cli.main"]), "collect-env", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def test_json_reports_every_section_with_what_is_installed_here():
    env = {**os.environ, "PDSERVE_API_KEY": "hush", "UCX_TLS": "tcp,cma", "UNRELATED_VARIABLE": "x"}
    result = collect_env("--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert list(report) == SECTIONS
    assert report["python"]["version"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}.")
    assert report["torch"]["version"] == torch.__version__
    assert report["torch"]["cuda_available"] == torch.cuda.is_available()
    assert report["packages"]["triton"] == importlib.metadata.version("triton")
    assert report["packages"]["torch"] == importlib.metadata.version("torch")
    nixl = report["nixl"]["nixl-cu12"]
    assert nixl == importlib.metadata.version("nixl-cu12")
    # the UCX bundled with nixl answers with its own version
    assert any(v[0].isdigit() for k, v in report["ucx"].items() if k.startswith("bundled"))
    environment = report["environment"]
    assert environment["UCX_TLS"] == "tcp,cma" and environment["PDSERVE_API_KEY"] == "***"
    assert "UNRELATED_VARIABLE" not in environment


def test_text_has_one_headed_section_per_part():
    result = collect_env()
    assert result.returncode == 0, result.stderr
    headers = [line for line in result.stdout.splitlines() if line.startswith("== ")]
    assert headers == [f"== {name} ==" for name in SECTIONS]
    assert f"  version: {torch.__version__}" in result.stdout


def test_without_torch_or_nixl_it_says_not_installed():
    # no site-packages at all: only the standard library and this repository
    python = [sys.executable, "-I", "-S", "-c",
              f"import sys; sys.path.insert(0, {str(REPO)!r}); from pdserve.cli.main import main; sys.exit(main())"]  # fmt: skip
    result = collect_env("--json", python=python)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["torch"] == {"version": "not installed"}
    for name in ("torch", "triton", "nixl-cu12", "transformers"):
        assert report["packages"][name] == "not installed"
    assert report["nixl"]["modules"] == "not installed"
    assert not any(key.startswith("bundled") for key in report["ucx"])
