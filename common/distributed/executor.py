"""Rank 0's side of a tensor-parallel engine: start the other ranks, feed them steps, stop them.

The engine's process is rank 0. It opens the rendezvous store, starts ranks 1..N-1 as
fresh interpreters (`python -m common.distributed.rank_worker`, so no CUDA state is
forked and, unlike multiprocessing's spawn, the caller's main module is never
re-imported: a script needs no `if __name__ == "__main__"` guard), waits until each
has joined, and forms the process group with them. Each rank then loads its own
shard and sizes its cache in step with rank 0 (every rank runs
common/engine/engine_setup.py's set_up_engine).

Steps travel as msgpack messages (step_message.py) over a local ZMQ PUSH socket per
rank (ipc:// in a private temporary folder), not through a collective: an idle engine
leaves its ranks waiting on a socket, where no collective timeout runs out, and the
ranks check there that rank 0 is still alive.

Shutdown sends each rank "shutdown", waits for it, and terminates (then kills) a rank
that does not exit; it runs on shutdown(), when the executor is collected, and at
interpreter exit. A rank whose parent dies exits on its own (rank_worker.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
import zmq

from common.config.engine_config import EngineConfig
from common.distributed import step_message
from common.distributed.group import (
    RENDEZVOUS_TIMEOUT,
    TensorParallelGroup,
    group_backend,
    open_store,
    rank_device,
)
from common.distributed.rank_worker import RankArgs, joined_key, step_address

logger = logging.getLogger(__name__)

_EXIT_WAIT_S = 10.0


class TensorParallelExecutor:
    """Ranks 1..N-1 of the engine `config` describes (a resolved EngineConfig), and rank 0's group."""

    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        size = config.tensor_parallel_size
        if size < 2:
            raise ValueError(f"a tensor-parallel executor needs at least 2 ranks, got {size}")
        self.size = size
        backend = group_backend(device, size)
        self._store = open_store(0, size)
        self._folder = tempfile.mkdtemp(prefix="pdserve-tp-")
        self._commands = [
            [
                sys.executable,
                "-m",
                "common.distributed.rank_worker",
                RankArgs(
                    config, rank, size, str(device), backend, self._store.port, self._folder, os.getpid()
                ).to_json(),
            ]
            for rank in range(1, size)
        ]
        self._processes: list[subprocess.Popen] = []
        self._zmq = zmq.Context()
        self._sockets: list[zmq.Socket] = []
        groups: list[TensorParallelGroup] = []  # filled once formed, for _stop to close
        self._finalizer = weakref.finalize(
            self, _stop, self._processes, self._sockets, self._zmq, self._folder, groups
        )
        try:
            env = _rank_environment()
            for command in self._commands:
                self._processes.append(subprocess.Popen(command, env=env))
            self._wait_until_joined()
            self.group = TensorParallelGroup(self._store, 0, size, rank_device(device, 0, size), backend)
            groups.append(self.group)
            for rank in range(1, size):
                socket = self._zmq.socket(zmq.PUSH)
                socket.setsockopt(zmq.SNDHWM, 0)  # never drop a step
                socket.setsockopt(zmq.LINGER, 1000)
                socket.connect(step_address(self._folder, rank))
                self._sockets.append(socket)
        except BaseException:
            self.shutdown()
            raise

    @property
    def rank_processes(self) -> list[subprocess.Popen]:
        """The processes of ranks 1..N-1, in rank order."""
        return list(self._processes)

    def send_step(self, message: bytes) -> None:
        """Hand one step to every other rank; the caller then runs it itself."""
        for socket in self._sockets:
            socket.send(message, copy=False)

    def start_rank_service(self, target: str, args: dict) -> None:
        """Ask ranks 1..N-1 to start the helper `target` ("module:function") names, with
        `args` (plain values); see step_message.encode_service and rank_worker.start_service."""
        self.send_step(step_message.encode_service(target, args))

    def check_ranks_alive(self) -> None:
        """RuntimeError naming a rank that has exited."""
        for rank, process in enumerate(self._processes, start=1):
            if process.poll() is not None:
                raise RuntimeError(
                    f"tensor-parallel rank {rank} exited with code {process.returncode}; its error is in "
                    "this process's output above"
                )

    def shutdown(self) -> None:
        """Stop every other rank (idempotent)."""
        self._finalizer()

    def _wait_until_joined(self) -> None:
        # The process group's constructor would wait out the whole rendezvous timeout for a
        # rank that failed to start; poll the store instead, watching the ranks.
        deadline = time.monotonic() + RENDEZVOUS_TIMEOUT.total_seconds()
        keys = [joined_key(rank) for rank in range(1, self.size)]
        while not self._store.check(keys):
            self.check_ranks_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tensor-parallel ranks did not start within {RENDEZVOUS_TIMEOUT.total_seconds():.0f} s"
                )
            time.sleep(0.05)


def _rank_environment() -> dict[str, str]:
    # the ranks import pdserve from where this process did, installed or not
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _stop(processes, sockets, context, folder: str, groups: list) -> None:
    for socket in sockets:
        try:
            socket.send(step_message.encode_shutdown(), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
    deadline = time.monotonic() + _EXIT_WAIT_S
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
            continue
        except subprocess.TimeoutExpired:
            logger.warning("tensor-parallel rank process %d did not exit; terminating it", process.pid)
        process.terminate()
        try:
            process.wait(5.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for socket in sockets:
        socket.close(linger=0)
    context.term()
    for group in groups:
        group.close()
    shutil.rmtree(Path(folder), ignore_errors=True)
