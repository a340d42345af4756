"""Every shipped connector implements common.kv_connector.KVConnector in full: structurally
(isinstance) and member by member, so a connector missing a member fails here."""

from __future__ import annotations

import pytest
import torch

from common.config.kv_transfer_config import KVTransferConfig
from common.kv_connector import KV_CONNECTOR_MEMBERS, KVConnector, missing_members
from kvtransfer.connector import ConnectorBase
from kvtransfer.cuda_ipc_connector import CudaIpcConnector
from kvtransfer.kv_cache_spec import KVCacheSpec
from kvtransfer.nixl_connector import NixlConnector, nixl_available
from kvtransfer.side_channel_connector import SideChannelConnector
from kvtransfer.tcp_connector import TcpConnector
from kvtransfer.tp_connector import TensorParallelConnector

SPEC = KVCacheSpec("m", "float32", num_kv_heads=1, head_size=4, num_layers=1, block_size=2)

# The interface, spelled out: a member added to or dropped from the Protocol shows up here.
PROTOCOL_MEMBERS = (
    "is_producer",
    "is_consumer",
    "tp_size",
    "attach_ranks",
    "register_kv_cache",
    "side_channel_address",
    "stats",
    "take_transfer_records",
    "close",
    "export_blocks",
    "take_freed_requests",
    "start_pull",
    "poll",
    "notify_done",
)

needs_nixl = pytest.mark.skipif(not nixl_available(), reason="the nixl package does not import here")

# (class, the role to build it for): a producer role, since before Python 3.12 isinstance()
# reads side_channel_address, which a consumer refuses; the side-channel base has no data
# path of its own, so only its producer half can be built
SHIPPED = [
    pytest.param(TcpConnector, "kv_both", id="TcpConnector"),
    pytest.param(NixlConnector, "kv_both", id="NixlConnector", marks=needs_nixl),
    pytest.param(CudaIpcConnector, "kv_both", id="CudaIpcConnector"),
    pytest.param(TensorParallelConnector, "kv_both", id="TensorParallelConnector"),
    pytest.param(SideChannelConnector, "kv_producer", id="SideChannelConnector"),
]


def config(role: str, connector: str = "TcpConnector") -> KVTransferConfig:
    return KVTransferConfig.from_dict({"kv_connector": connector, "kv_role": role, "kv_port": 0})


def test_the_protocol_has_the_members_the_callers_use():
    assert KV_CONNECTOR_MEMBERS == PROTOCOL_MEMBERS


@pytest.mark.parametrize(("cls", "role"), SHIPPED)
def test_a_shipped_connector_defines_every_protocol_member(cls, role):
    assert missing_members(cls) == []
    assert not getattr(cls, "__abstractmethods__", frozenset())
    for name in PROTOCOL_MEMBERS:
        assert any(name in vars(klass) for klass in cls.__mro__ if klass is not object), name


@pytest.mark.parametrize(("cls", "role"), SHIPPED)
def test_a_shipped_connector_is_a_kv_connector_structurally(cls, role):
    connector = cls(config(role), role, SPEC)
    try:
        connector.attach_ranks(None)  # one rank: nothing to start
        connector.register_kv_cache(torch.zeros(SPEC.kv_cache_shape(4)))
        assert isinstance(connector, KVConnector)
        host, port = connector.side_channel_address
        assert isinstance(host, str) and port > 0
        assert connector.tp_size == 1
        assert connector.take_transfer_records() == []
        assert isinstance(connector.stats(), dict)
    finally:
        connector.close()


def test_a_consumer_has_no_side_channel_address():
    with TcpConnector(config("kv_consumer"), "kv_consumer", SPEC) as connector:
        with pytest.raises(RuntimeError, match="side_channel_address is for producers"):
            connector.side_channel_address  # noqa: B018


class _Executor:
    size = 2


def test_a_single_cache_connector_refuses_the_ranks_of_a_tensor_parallel_engine():
    with TcpConnector(config("kv_producer"), "kv_producer", SPEC) as connector:
        with pytest.raises(ValueError, match="serves one cache.*2 tensor-parallel ranks.*tp_size=N"):
            connector.attach_ranks(_Executor())


def test_a_tensor_parallel_connector_of_several_ranks_needs_the_executor():
    connector = TensorParallelConnector(config("kv_producer"), "kv_producer", SPEC, tp_size=2)
    try:
        with pytest.raises(ValueError, match="needs the executor"):
            connector.attach_ranks(None)
    finally:
        connector.close()


def test_a_class_missing_members_is_named_and_an_abstract_one_cannot_be_built():
    class Partial:
        is_producer = True

        def poll(self):
            return None

    missing = missing_members(Partial)
    assert "poll" not in missing and "is_producer" not in missing
    assert missing == [m for m in PROTOCOL_MEMBERS if m not in ("poll", "is_producer")]

    class Abstract(ConnectorBase):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Abstract(config("kv_both"), "kv_both", SPEC)
