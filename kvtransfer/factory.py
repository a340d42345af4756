"""Build the connector that --kv-transfer-config names: every connector is built here.

`build_worker_connector` is what a worker calls; `create_engine_connector` builds for an
engine of any number of tensor-parallel ranks (TensorParallelConnector above one);
`create_connector` builds the named connector over one cache (one rank).

    NixlConnector    NIXL READs (needs the nixl package: `pip install nixl-cu12`)
    TcpConnector     pure Python over the ZMQ side channel
    CudaIpcConnector engines on one machine: GPU caches copied directly through CUDA
                     IPC (one kernel per pull), any other pair over TCP as TcpConnector
    MultiConnector   kv_connector_extra_config.connectors, tried in order: the first
                     that can run here is used (e.g. NIXL where installed, else TCP)
    any other name   a class of that name in kv_connector_module_path

The config was validated when it was parsed (common/config/kv_transfer_config.py);
here a connector that cannot run on this machine fails with ConnectorUnavailableError,
saying what to install or choose instead.
"""

from __future__ import annotations

import importlib

from common.config.kv_transfer_config import KVTransferConfig
from common.kv_connector import KVConnector, missing_members
from kvtransfer.connector import ConnectorUnavailableError
from kvtransfer.kv_cache_spec import KVCacheSpec


def default_connector_name() -> str:
    """NixlConnector where the nixl package imports, else TcpConnector."""
    from kvtransfer.nixl_connector import nixl_available

    return "NixlConnector" if nixl_available() else "TcpConnector"


def create_connector(
    config: KVTransferConfig,
    role: str | None,
    kv_spec: KVCacheSpec,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> KVConnector:
    """The connector for `config`, acting as `role` (None: config.kv_role)."""
    role = role or config.kv_role
    if role is None:
        raise ValueError(
            "a KV connector needs a role: set kv_role in --kv-transfer-config to kv_producer "
            "(prefill), kv_consumer (decode) or kv_both"
        )
    name = config.kv_connector
    if name is None:
        raise ValueError(
            "--kv-transfer-config names no kv_connector; set it, for example to "
            f'"{default_connector_name()}" (the best one that runs here)'
        )
    kwargs = {"tp_rank": tp_rank, "tp_size": tp_size}
    if config.kv_connector_module_path is not None:
        return _out_of_tree_class(config)(config, role, kv_spec, **kwargs)
    if name == "TcpConnector":
        from kvtransfer.tcp_connector import TcpConnector

        return TcpConnector(config, role, kv_spec, **kwargs)
    if name == "NixlConnector":
        from kvtransfer.nixl_connector import NixlConnector

        return NixlConnector(config, role, kv_spec, **kwargs)
    if name == "CudaIpcConnector":
        from kvtransfer.cuda_ipc_connector import CudaIpcConnector

        return CudaIpcConnector(config, role, kv_spec, **kwargs)
    if name == "MultiConnector":
        return _first_that_runs(config, role, kv_spec, tp_rank=tp_rank, tp_size=tp_size)
    raise ValueError(
        f"unknown kv_connector {name!r}; pdserve ships NixlConnector, TcpConnector, CudaIpcConnector "
        "and MultiConnector "
        "(set kv_connector_module_path for an out-of-tree class)"
    )


def _out_of_tree_class(config: KVTransferConfig) -> type[KVConnector]:
    """The class kv_connector names in kv_connector_module_path, checked against the Protocol."""
    path, name = config.kv_connector_module_path, config.kv_connector
    try:
        module = importlib.import_module(path)
    except ImportError as e:
        raise ConnectorUnavailableError(f"cannot import kv_connector_module_path {path!r}: {e}") from None
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        raise ValueError(
            f"module {path!r} has no class named {name!r}; kv_connector must name a class in "
            "kv_connector_module_path that implements common.kv_connector.KVConnector"
        )
    missing = missing_members(cls)
    if missing:
        raise ValueError(
            f"{path}.{name} does not implement common.kv_connector.KVConnector: it lacks "
            f"{', '.join(missing)} (kvtransfer.connector.ConnectorBase declares every member)"
        )
    return cls


def _first_that_runs(
    config: KVTransferConfig, role: str, kv_spec: KVCacheSpec, *, tp_rank: int, tp_size: int
) -> KVConnector:
    reasons = []
    for i, sub in enumerate(config.kv_connector_extra_config["connectors"]):
        # a sub-config inherits the parent's fields and overrides the ones it sets
        sub_config = KVTransferConfig.from_dict({**config.to_dict(), "kv_connector_extra_config": {}, **sub})
        try:
            return create_connector(sub_config, role, kv_spec, tp_rank=tp_rank, tp_size=tp_size)
        except ConnectorUnavailableError as e:
            reasons.append(f"connectors[{i}] {sub_config.kv_connector}: {e}")
    raise ConnectorUnavailableError(
        "MultiConnector found no connector that runs here: " + " | ".join(reasons)
    )


def create_engine_connector(
    config: KVTransferConfig, role: str | None, kv_spec: KVCacheSpec, *, tp_size: int = 1
) -> KVConnector:
    """The connector of an engine of `tp_size` ranks: the configured one for a single rank,
    else a TensorParallelConnector running one per rank (`kv_spec`: all KV heads)."""
    if tp_size == 1:
        return create_connector(config, role, kv_spec)
    role = role or config.kv_role
    create_connector(config, role, kv_spec).close()  # fails here, naming the fix, if it cannot run
    from kvtransfer.tp_connector import TensorParallelConnector

    return TensorParallelConnector(config, role, kv_spec, tp_size=tp_size)


def build_worker_connector(config: KVTransferConfig, spec_fields: dict, tp_size: int = 1) -> KVConnector:
    """A prefill or decode worker's connector from --kv-transfer-config and its cache's spec fields
    (one per rank above 1); a connector that cannot run here is a ValueError naming the fix."""
    try:
        return create_engine_connector(config, config.kv_role, KVCacheSpec(**spec_fields), tp_size=tp_size)
    except ConnectorUnavailableError as e:
        raise ValueError(f"{e}; or name another kv_connector in --kv-transfer-config") from None


class _WorkerConnectors:
    """common.kv_connector.WorkerConnectors over this module's functions."""

    def default_name(self) -> str:
        return default_connector_name()

    def build(self, config: KVTransferConfig, spec_fields: dict, tp_size: int) -> KVConnector:
        return build_worker_connector(config, spec_fields, tp_size)


# what a worker role is given to build its connector with
WORKER_CONNECTORS = _WorkerConnectors()
