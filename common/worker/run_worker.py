"""Start a worker of either role: the engine, its KV connector and the role's hooks, the
KV-event publisher, the metrics endpoint and the serving loop, until SIGTERM or SIGINT;
then stop them all. What differs between the roles comes in through the Role (role.py).

Once the worker serves, it prints one line
`pdserve <role> worker <worker id> ready at <address>` and, with --ready-file, writes a
JSON file with what launchers and routers need to reach it (see `ready_info`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.advertised_host import advertise_endpoint, advertised_host
from common.block_hash import install_cluster_hash_seed, require_shared_hash_seed
from common.config.engine_args import engine_config_from_args
from common.config.engine_config import EngineConfig
from common.frame_auth import (
    WORKER_CHANNEL,
    install_cluster_secret,
    installed_frame_auth,
    load_cluster_secret,
)
from common.kv_connector import KVConnector
from common.model_files import resolve_model
from common.worker.load_reports import LoadReporter
from common.worker.role import Role, kv_transfer_config_for
from common.worker.worker_args import WorkerOptions, worker_options_from_args

if TYPE_CHECKING:
    from common.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)


def run_worker(args: argparse.Namespace, role: Role) -> int:
    """`pdserve prefill` / `pdserve decode`: serve until a signal; the exit status."""
    options = worker_options_from_args(args)
    name = role.name.value
    logging.basicConfig(
        level=options.log_level.upper(), format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s"
    )
    try:
        config = engine_config_from_args(args)
        config = dataclasses.replace(
            config, kv_transfer_config=kv_transfer_config_for(config.kv_transfer_config, role)
        )
        secret = load_cluster_secret(options.cluster_secret_file)
        # before anything loads: a router could never recompute this worker's block hashes
        require_shared_hash_seed(config.prefix_caching_hash_algo, secret, f"{name} worker")
        install_cluster_hash_seed(secret)
        model_name = resolve_model(config.model, config.revision, config.download_dir).name
        # the KV side channel, built inside the connector, finds it installed (docs/security.md)
        install_cluster_secret(secret)
    except ValueError as e:
        print(f"pdserve {name}: {e}", file=sys.stderr)
        return 2
    try:
        worker = WorkerProcess(config, role, options, model_name)
    except ValueError as e:  # settings that do not fit the model, a busy port ...
        print(f"pdserve {name}: {e}", file=sys.stderr)
        return 1
    with worker:
        worker.serve()
    return 0


class WorkerProcess:
    """The parts of a running worker, built in order and closed in reverse."""

    def __init__(self, config: EngineConfig, role: Role, options: WorkerOptions, model_name: str) -> None:
        from common.engine.engine_setup import resolve_device
        from common.engine.llm_engine import LLMEngine
        from common.kv_event_publisher import make_kv_event_publisher
        from common.worker.engine_server import EngineServer

        self.role = role
        self.options = options
        self.model_name = model_name
        self.connector: KVConnector | None = None
        self.publisher: Any = None
        self.metrics: Any = None
        self.server: EngineServer | None = None
        self.heartbeat: Any = None  # common.registry_heartbeat.RegistryHeartbeat with --registry
        try:
            on_gpu = resolve_device(config.device).type == "cuda"
            if on_gpu:  # graph capture compiles kernels already: the folder must work before it
                from common.engine.kernel_cache import require_writable_kernel_cache

                logger.info("Triton kernel cache: %s", require_writable_kernel_cache())
            self.engine = engine = LLMEngine.from_config(config)
            config = engine.config
            self._warm_up(on_gpu)
            self.connector = connector = role.connectors.build(
                config.kv_transfer_config,
                kv_cache_spec_fields(engine, model_name),
                config.tensor_parallel_size,
            )
            # only this role's hooks, even under kv_both: routers send it nothing else
            engine.attach_kv_transfer(connector, [role.build_hooks(engine, connector)])
            self.publisher = make_kv_event_publisher(config.kv_events_config)
            self.metrics_port = None
            if options.metrics_port is not None:
                from common.worker.worker_metrics import WorkerMetrics

                self.metrics = WorkerMetrics(
                    model_name=served_name(config, model_name),
                    engine=config.kv_transfer_config.engine_id,
                    role=role.name.value,
                    max_model_len=config.max_model_len,
                )
                self.metrics_port = self.metrics.serve_http(options.metrics_host, options.metrics_port)
            reporter_type = LoadReporter
            if options.registry:  # the heartbeat reports the load the serving loop saw last
                from common.registry_heartbeat import RecordingLoadReporter

                reporter_type = RecordingLoadReporter
            self.reporter = reporter_type(
                worker_id="", role=role.name.value, engine_id=config.kv_transfer_config.engine_id
            )
            self.server = EngineServer(
                engine,
                address=options.address,
                reporter=self.reporter,
                publisher=self.publisher,
                metrics=self.metrics,
                connector=self.connector,
                auth=installed_frame_auth(WORKER_CHANNEL),
            )
            self.worker_id = options.worker_id or default_worker_id(role.name.value, self.server.address)
            self.reporter.worker_id = self.worker_id
            self.reporter.info = self.ready_info()
        except BaseException:
            self.close()
            raise

    def _warm_up(self, on_gpu: bool) -> None:
        """--warmup: run every shape serving needs before saying ready (common/engine/warmup.py);
        on a GPU, then log each kernel that still compiles while serving: a shape it missed."""
        from common.engine.engine_setup import resolve_warmup

        if not resolve_warmup(self.engine.config):
            return
        from common.engine.warmup import log_kernel_compiles_while_serving, warm_up

        logger.info(warm_up(self.engine).summary())
        if on_gpu:
            log_kernel_compiles_while_serving()

    def ready_info(self) -> dict[str, Any]:
        """What routers and launchers need to know about this worker (msgpack- and JSON-safe):
        a LoadReport carries the fields of it that it has (common/worker/load_reports.py)."""
        config = self.engine.config
        transfer = config.kv_transfer_config
        server = self.server
        assert server is not None
        advertise = advertised_host(server.address)
        side_channel = None
        if self.connector is not None and self.connector.is_producer:
            host, port = self.connector.side_channel_address
            side_channel = f"{host}:{port}"
        return {
            "worker_id": self.worker_id,
            "role": self.role.name.value,
            "address": server.address,
            "engine_id": transfer.engine_id,
            "model": self.model_name,
            "served_model_name": served_name(config, self.model_name),
            "max_model_len": config.max_model_len,
            "block_size": config.block_size,
            "num_kv_blocks": self.engine.block_pool.num_usable_blocks,
            "max_num_seqs": config.max_num_seqs,  # sizes the router's admission limit
            "enable_prefix_caching": bool(config.enable_prefix_caching),
            "prefix_caching_hash_algo": config.prefix_caching_hash_algo,
            "prefix_caching_hash_seed": os.environ.get("PYTHONHASHSEED"),
            "kv_events_endpoint": advertise_endpoint(getattr(self.publisher, "endpoint", None), advertise),
            "kv_replay_endpoint": advertise_endpoint(
                getattr(self.publisher, "replay_endpoint", None), advertise
            ),
            "kv_events_topic": config.kv_events_config.topic if config.kv_events_config else "",
            "kv_connector": transfer.kv_connector,
            "kv_role": transfer.kv_role,
            "kv_load_failure_policy": transfer.kv_load_failure_policy,
            "kv_side_channel": side_channel,
            "metrics_port": self.metrics_port,
            "pid": os.getpid(),
        }

    def serve(self) -> None:
        server = self.server
        assert server is not None
        previous = {
            sig: signal.signal(sig, lambda *_: server.request_stop())
            for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            info = self.reporter.info
            if self.options.ready_file:
                write_json_atomically(Path(self.options.ready_file), info)
            print(
                f"pdserve {self.role.name.value} worker {self.worker_id} ready at {server.address}",
                flush=True,
            )
            if self.options.registry:
                self.heartbeat = self._start_heartbeat(info)
            server.run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        logger.info("stopped")

    def _start_heartbeat(self, info: dict[str, Any]) -> Any:
        """Register in --registry and keep the record alive while serving."""
        from common.registry import WorkerRecord
        from common.registry_heartbeat import RegistryHeartbeat, load_of

        assert self.server is not None and self.options.registry
        record = WorkerRecord(
            worker_id=self.worker_id,
            role=self.role.name.value,
            address=advertise_endpoint(self.server.address, advertised_host(self.server.address)) or "",
            model=self.model_name,
            engine_id=info["engine_id"],
            ttl_s=self.options.registry_ttl_s,
            served_model_name=info["served_model_name"],
            kv_events_endpoint=info["kv_events_endpoint"],
            kv_replay_endpoint=info["kv_replay_endpoint"],
            tensor_parallel_size=self.engine.config.tensor_parallel_size,
            metrics_port=self.metrics_port,
        )
        reporter = self.reporter
        heartbeat = RegistryHeartbeat(self.options.registry, record, lambda: load_of(reporter.last_stats))
        heartbeat.start()
        return heartbeat

    def close(self) -> None:
        for part in (self.heartbeat, self.server, self.metrics, self.publisher, self.connector):
            if part is None:
                continue
            try:
                part.close()
            except Exception:
                logger.exception("closing %s failed", type(part).__name__)

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def kv_cache_spec_fields(engine: LLMEngine, model_name: str) -> dict[str, Any]:
    """The KVCacheSpec fields of an engine (the connector's cache spec): what a peer's
    cache must match before blocks move between them."""
    model_config = engine.model_config
    dtype = next(engine.model.parameters()).dtype
    return {
        "model": model_name,
        "dtype": str(dtype),
        "num_kv_heads": model_config.num_key_value_heads,
        "head_size": model_config.head_dim,
        "num_layers": model_config.num_hidden_layers,
        "block_size": engine.config.block_size,
        "cache_dtype": str(engine.runner.kv_cache.dtype),
    }


def served_name(config: EngineConfig, model_name: str) -> str:
    return config.served_model_name[0] if config.served_model_name else model_name


def default_worker_id(role: str, address: str) -> str:
    port = address.rpartition(":")[2]
    return f"{role}-{socket.gethostname()}-{port}"


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)
