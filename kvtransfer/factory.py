"""Build the connector that --kv-transfer-config names.

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
from kvtransfer.connector import ConnectorUnavailableError, KVConnector
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
    path, name = config.kv_connector_module_path, config.kv_connector
    try:
        module = importlib.import_module(path)
    except ImportError as e:
        raise ConnectorUnavailableError(f"cannot import kv_connector_module_path {path!r}: {e}") from None
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, KVConnector)):
        raise ValueError(
            f"module {path!r} has no KVConnector subclass named {name!r}; kv_connector must name "
            "a class in kv_connector_module_path that subclasses kvtransfer.connector.KVConnector"
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
