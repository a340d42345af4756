"""`pdserve serve`: the whole disaggregated system on this machine, in one command.

    pdserve serve                      # the embedded model: 1 prefill, 1 decode worker, a router
    pdserve serve --model /models/llama --num-decode-workers 2 --port 8080

It only launches processes (`python -m pdserve.cli.main prefill|decode|router ...`). Its
parser is composed of the router's and the engine's own declarations (router/cli.py,
common/config/engine_args.py), and each child's command line is written from the parsed
values of the options that child's parser declares (common/config/argv_of.py): engine
flags go to every worker, router flags to the router, the model flags to both. Each
worker also gets a free --worker-address, free KV-event and KV-transfer ports, a
--metrics-port and a --ready-file where it says where it listens. Once every worker is ready the router starts with their addresses and the model flags, and when
its /health answers 200 the URL is printed. Ctrl-C or SIGTERM stops them all: the
children share one process group, get SIGTERM, then SIGKILL after a grace period, and
on Linux also die with this process if it is killed outright (no orphans).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.advertised_host import is_wildcard
from common.block_hash import require_shared_hash_seed
from common.config.arg_parser import PdserveArgumentParser
from common.config.arg_types import int_at_least
from common.config.argv_of import argv_of
from common.config.engine_args import add_engine_args
from common.frame_auth import load_cluster_secret
from common.worker.worker_args import add_registry_args, add_worker_args
from router.cli import add_router_args, add_router_serving_args, check_tool_calling_args

DEFAULT_STARTUP_TIMEOUT_S = 600.0
_STOP_GRACE_S = 15.0
_POLL_S = 0.1
# what serve gives the router itself: the port it picked, the workers it started, and the
# API keys, which go in the router's environment, never on its command line (`ps`)
_SET_FOR_THE_ROUTER = ("port", "api_key", "decode_workers", "prefill_workers")


@dataclass(frozen=True)
class ChildFlags:
    """Which of serve's options each child gets: those its own parser declares, so a flag
    added to the router's or the workers' parser reaches them with no change here."""

    router: tuple[argparse.Action, ...]
    worker: tuple[argparse.Action, ...]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="Start a router, a prefill and a decode worker on this machine (OpenAI-compatible API server).",
        description="Start the disaggregated system on this machine: prefill workers, decode workers and "
        "the OpenAI-compatible router in front of them, on the embedded model unless --model says "
        "otherwise. The router's flags go to the router, the engine flags to every worker (the model "
        "flags to both). Ctrl-C stops everything.",
    )
    _add_serve_args(parser.add_argument_group("serve"))
    add_router_serving_args(parser)
    add_engine_args(parser)
    parser.set_defaults(func=run, child_flags=_child_flags(parser))


def _add_serve_args(group: Any) -> None:
    group.add_argument("--num-prefill-workers", type=int_at_least(0), default=None,
                       help="Prefill workers to start; 0 starts none (the decode workers prefill: aggregated). "
                       "Default: 1 where a GPU is present, 0 on a CPU-only machine, where a second engine "
                       "process would only split the same cores (docs/benchmarks.md, CPU path).")  # fmt: skip
    group.add_argument(
        "--num-decode-workers", type=int_at_least(1), default=1, help="Decode workers to start."
    )
    group.add_argument("--startup-timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT_S,
                       help="Seconds to wait for every process to be ready before giving up.")  # fmt: skip
    add_registry_args(group)  # the workers register in it and the router watches it


def gpu_present(device: str) -> bool:
    """Whether the workers will run on a GPU, without importing torch: --device, else an
    NVIDIA device node that CUDA_VISIBLE_DEVICES does not hide."""
    if device != "auto":
        return device == "cuda"
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def _child_flags(parser: argparse.ArgumentParser) -> ChildFlags:
    def taken_by(
        add_args: Callable[[PdserveArgumentParser], None], set_by_serve: Sequence[str] = ()
    ) -> tuple[argparse.Action, ...]:
        child = PdserveArgumentParser(add_help=False)
        add_args(child)
        dests = {action.dest for action in child._actions} - set(set_by_serve)
        return tuple(action for action in parser._actions if action.dest in dests)

    return ChildFlags(
        router=taken_by(add_router_args, _SET_FOR_THE_ROUTER),
        worker=taken_by(lambda child: add_worker_args(child, role="decode")),
    )


def worker_argv(args: argparse.Namespace) -> list[str]:
    """What every worker gets: the options its parser declares, with the values serve parsed
    (the LoRA flags included: the workers load the adapters the router names)."""
    return argv_of(_as_written(args), args.child_flags.worker)


def router_argv(args: argparse.Namespace, prefill: list[str], decode: list[str], port: int) -> list[str]:
    """What the router gets: the workers' addresses, its port, and the options its parser
    declares (the model and LoRA flags included) with the values serve parsed."""
    argv = ["--port", str(port), "--decode-workers", ",".join(decode)]
    if prefill:
        argv += ["--prefill-workers", ",".join(prefill)]
    return argv + argv_of(_as_written(args), args.child_flags.router)


def _as_written(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with the values that parsed into objects back in a form the child parses again:
    each --lora-modules entry (a LoRAModulePath) as its JSON object."""
    modules = getattr(args, "lora_modules", None)
    if not modules:
        return args
    written = argparse.Namespace(**vars(args))
    written.lora_modules = [json.dumps(module.to_dict()) for module in modules]
    return written


def worker_env() -> dict[str, str]:
    """The workers' environment: NIXL's UCX listens on loopback only, as everything serve
    starts does, unless $UCX_NET_DEVICES says otherwise (UCX's default is every interface)."""
    env = dict(os.environ)
    env.setdefault("UCX_NET_DEVICES", "lo")
    return env


def router_env(args: argparse.Namespace) -> dict[str, str]:
    """The router's environment: this one's, plus the API keys given on serve's command line
    (kept off the router's command line, which every local user can read)."""
    env = dict(os.environ)
    if args.api_key:
        env["PDSERVE_API_KEY"] = ",".join(args.api_key)
    return env


@dataclass
class _Child:
    name: str
    process: subprocess.Popen
    ready_file: Path | None = None
    info: dict[str, Any] | None = None


class _Launcher:
    """The children, started into one process group and stopped together."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[_Child] = []
        self._group: int | None = None

    def start(
        self, name: str, argv: list[str], ready_file: Path | None = None, env: dict[str, str] | None = None
    ) -> _Child:
        command = [sys.executable, "-m", "pdserve.cli.main", *argv]
        group = self._group if self._group is not None else 0  # 0: a new group led by this child

        def in_the_group() -> None:  # runs in the child before exec
            os.setpgid(0, group)
            _die_with_parent()

        process = subprocess.Popen(command, preexec_fn=in_the_group, env=env)
        if self._group is None:
            self._group = process.pid
        child = _Child(name, process, ready_file)
        self.children.append(child)
        return child

    def exited(self) -> _Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def stop(self) -> None:
        if self._group is None:
            return
        _signal_group(self._group, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE_S
        for child in self.children:
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # whatever is left of the group (a child's own children included) goes now
        _signal_group(self._group, signal.SIGKILL)
        for child in self.children:
            child.process.wait()


class _Interrupted(Exception):
    pass


class _StartupFailed(Exception):
    pass


def run(args: argparse.Namespace) -> int:
    """The subcommand: start, wait until ready, print the URL, serve until a signal."""
    workdir = Path(tempfile.mkdtemp(prefix="pdserve-serve-"))
    launcher = _Launcher(workdir)
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    status = 0
    try:
        status = _serve(args, launcher)
    except _Interrupted:
        print("pdserve serve: stopping", file=sys.stderr, flush=True)
    except _StartupFailed as exc:
        print(f"pdserve serve: {exc}", file=sys.stderr, flush=True)
        status = 1
    finally:
        # a second Ctrl-C must not leave children behind while they are being stopped
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        launcher.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(workdir, ignore_errors=True)
    return status


def _serve(args: argparse.Namespace, launcher: _Launcher) -> int:
    deadline = time.monotonic() + args.startup_timeout
    try:  # a secret that cannot be read, no shared hash seed, or tool-calling flags that do not
        # fit stop everything before anything starts
        check_tool_calling_args(args)
        secret = load_cluster_secret(args.cluster_secret_file)
        if args.prefix_caching_hash_algo is not None:
            require_shared_hash_seed(args.prefix_caching_hash_algo, secret, "pdserve serve")
    except ValueError as exc:
        raise _StartupFailed(str(exc)) from None
    common = worker_argv(args)
    if args.num_prefill_workers is None:
        args.num_prefill_workers = 1 if gpu_present(args.device) else 0
    if args.num_prefill_workers == 0 and args.kv_transfer_config is None:
        # nothing to pull from: the lightest connector, not NIXL's agent (half a second of
        # start-up on a CPU); as vLLM, where no --kv-transfer-config means no transfer
        common += ["--kv-transfer-config", '{"kv_connector": "TcpConnector", "kv_role": "kv_both"}']
    for role, count in (("prefill", args.num_prefill_workers), ("decode", args.num_decode_workers)):
        for i in range(count):
            ready_file = launcher.workdir / f"{role}-{i}.json"
            argv = [
                role,
                *common,
                "--worker-address", "tcp://127.0.0.1:0",
                "--ready-file", str(ready_file),
                "--metrics-port", "0",
                # on one machine every worker needs its own ports
                "--kv-events-config.enable_kv_cache_events", "true",
                "--kv-events-config.endpoint", "tcp://127.0.0.1:*",
                "--kv-events-config.replay_endpoint", "tcp://127.0.0.1:*",
                "--kv-transfer-config.kv_port", "0",
            ]  # fmt: skip
            launcher.start(f"{role} worker {i}", argv, ready_file, env=worker_env())
    workers = list(launcher.children)
    for child in workers:
        child.info = _wait_for_ready_file(child, launcher, deadline)
    prefill = [c.info["address"] for c in workers if c.name.startswith("prefill")]  # type: ignore[index]
    decode = [c.info["address"] for c in workers if c.name.startswith("decode")]  # type: ignore[index]

    port = args.port or _free_port(args.host)
    router = launcher.start(
        "router", ["router", *router_argv(args, prefill, decode, port)], env=router_env(args)
    )
    url = f"http://{_url_host(args.host)}:{port}"
    _wait_for_health(url, router, launcher, deadline, _health_key(args))
    for child in workers:
        info = child.info or {}
        print(f"pdserve serve: {child.name} {info.get('worker_id')} at {info.get('address')} "
              f"(metrics on port {info.get('metrics_port')})", flush=True)  # fmt: skip
    print(f"pdserve serve: ready at {url} (OpenAI API at {url}/v1; Ctrl-C stops)", flush=True)

    while True:
        child = launcher.exited()
        if child is not None:
            print(f"pdserve serve: the {child.name} exited with status {child.process.returncode}; "
                  "stopping everything", file=sys.stderr, flush=True)  # fmt: skip
            return 1
        time.sleep(_POLL_S)


def _wait_for_ready_file(child: _Child, launcher: _Launcher, deadline: float) -> dict[str, Any]:
    assert child.ready_file is not None
    while not child.ready_file.exists():
        _check_progress(child, launcher, deadline)
        time.sleep(_POLL_S)
    return json.loads(child.ready_file.read_text(encoding="utf-8"))


def _health_key(args: argparse.Namespace) -> str | None:
    """The key /health needs under --health-access api-key (one the router accepts)."""
    if args.health_access != "api-key":
        return None
    from_env = os.environ.get("PDSERVE_API_KEY") or os.environ.get("VLLM_API_KEY") or ""
    keys = args.api_key or [key.strip() for key in from_env.split(",") if key.strip()]
    return keys[0] if keys else None


def _wait_for_health(
    url: str, router: _Child, launcher: _Launcher, deadline: float, api_key: str | None = None
) -> None:
    request = urllib.request.Request(url + "/health")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass  # not listening yet, or 503 until every worker reported
        _check_progress(router, launcher, deadline)
        time.sleep(_POLL_S)


def _check_progress(waiting_for: _Child, launcher: _Launcher, deadline: float) -> None:
    child = launcher.exited()
    if child is not None:
        raise _StartupFailed(
            f"the {child.name} exited with status {child.process.returncode} while starting; "
            "its output above says why"
        )
    if time.monotonic() > deadline:
        raise _StartupFailed(
            f"the {waiting_for.name} was not ready within --startup-timeout; raise it, or see the output above"
        )


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise _Interrupted()


def _signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _die_with_parent() -> None:
    """In the child before exec: on Linux, get SIGTERM if `pdserve serve` dies without cleaning up."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1" if is_wildcard(host) else host, 0))
        return s.getsockname()[1]


def _url_host(host: str) -> str:
    return "127.0.0.1" if is_wildcard(host) else host
