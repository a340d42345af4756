"""A tensor-parallel rank other than 0: its process's whole life.

Started by rank 0's executor (executor.py) as `python -m common.distributed.rank_worker
ARGS_JSON`: join the group, load this rank's shard and size the cache with the others
(common/engine/engine_setup.py, as rank 0 does), then run every step rank 0 sends until
"shutdown", or until rank 0's process is gone (checked each second while idle; during a
step a dead peer breaks the collective, which raises). Arguments are JSON, steps msgpack (step_message.py); nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from common.config.engine_config import EngineConfig
from common.distributed import step_message
from common.distributed.group import TensorParallelGroup, open_store, rank_device

logger = logging.getLogger(__name__)

_PARENT_CHECK_MS = 1000
# The EngineConfig fields a rank reads (loading, cache sizing, its runner); all plain values.
RANK_CONFIG_FIELDS = (
    "model",
    "revision",
    "download_dir",
    "load_format",
    "dtype",
    "hf_config_path",
    "seed",
    "kv_cache_dtype",
    "max_model_len",
    "block_size",
    "max_num_batched_tokens",
    "max_num_seqs",
    "num_gpu_blocks_override",
    "kv_cache_memory_bytes",
    "gpu_memory_utilization",
    "tensor_parallel_size",
)


@dataclass(frozen=True)
class RankArgs:
    config: EngineConfig  # resolved by rank 0 (engine_setup.resolve_engine_config)
    rank: int
    size: int
    device: str  # the engine's device; the rank picks its own from it (rank_device)
    backend: str  # nccl | gloo
    store_port: int
    folder: str  # rank 0's private folder holding the step sockets
    parent_pid: int

    def to_json(self) -> str:
        fields: dict[str, Any] = {name: getattr(self.config, name) for name in RANK_CONFIG_FIELDS}
        fields["model"] = None if fields["model"] is None else str(fields["model"])
        args = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "config"}
        return json.dumps({"config": fields, **args})

    @classmethod
    def from_json(cls, text: str) -> RankArgs:
        args = json.loads(text)
        return cls(config=EngineConfig(**args.pop("config")), **args)


def step_address(folder: str, rank: int) -> str:
    return f"ipc://{folder}/rank-{rank}"


def joined_key(rank: int) -> str:
    return f"joined-{rank}"


def run_rank(args: RankArgs) -> None:
    """The rank's process: returns when rank 0 says shutdown or is gone."""
    from common.engine.engine_setup import set_up_engine
    from common.engine.model_runner import ModelRunner

    logging.basicConfig(level=logging.WARNING, format=f"tp rank {args.rank}: %(levelname)s %(message)s")
    # Ctrl-C reaches the whole process group: rank 0 decides when the ranks stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    device = rank_device(torch.device(args.device), args.rank, args.size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.size))
    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.bind(step_address(args.folder, args.rank))
    store = open_store(args.rank, args.size, args.store_port)
    store.set(joined_key(args.rank), "1")
    group = TensorParallelGroup(store, args.rank, args.size, device, args.backend)
    try:
        # the same setup as rank 0's, in step with it (the shard and the cache agreement)
        setup = set_up_engine(args.config, device, tp_group=group)
        config = setup.config
        runner = ModelRunner(
            setup.model,
            setup.model_config,
            num_blocks=setup.num_blocks,
            block_size=config.block_size,
            kv_cache_dtype=config.kv_cache_dtype,
            device=device,
            dtype=next(setup.model.parameters()).dtype,
            seed=config.seed,
            max_model_len=config.max_model_len,
            enforce_eager=True,
        )
        services: list[Any] = []
        try:
            _serve(runner, socket, args, services)
        finally:
            for service in reversed(services):
                try:
                    service.close()
                except Exception:
                    logger.exception("closing the rank's %s failed", type(service).__name__)
    finally:
        socket.close(linger=0)
        context.term()
        group.close()
        _remove_step_socket(args.folder, args.rank)


def start_service(message: bytes, runner, args: RankArgs) -> Any:
    """Start the helper a service message names: `function(rank=, size=, kv_cache=, args=)`
    returns an object whose close() stops it. The helper reports its own errors to rank 0
    (rank 0 waits for it, watching this process), so a failing one only logs here."""
    target, service_args = step_message.decode_service(message)
    module, _, name = target.partition(":")
    function = getattr(importlib.import_module(module), name)
    return function(rank=args.rank, size=args.size, kv_cache=runner.kv_cache, args=service_args)


def _remove_step_socket(folder: str, rank: int) -> None:
    # rank 0 removes the folder; after a killed rank 0, the last rank to leave does
    try:
        os.unlink(step_address(folder, rank).removeprefix("ipc://"))
        os.rmdir(folder)
    except OSError:
        pass


def _serve(runner, socket: zmq.Socket, args: RankArgs, services: list[Any]) -> None:
    while True:
        if socket.poll(_PARENT_CHECK_MS):
            message = socket.recv()
            if step_message.is_service(message):
                services.append(start_service(message, runner, args))
            elif not runner.run_step_message(message):
                return
        elif os.getppid() != args.parent_pid:  # re-parented: the engine's process is gone
            logger.warning("the engine's process is gone; exiting")
            return


if __name__ == "__main__":
    run_rank(RankArgs.from_json(sys.argv[1]))
