"""create_connector: --kv-transfer-config to a connector, and clear errors where the
named connector cannot run."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import kvtransfer.nixl_connector as nixl_connector
from common.config.kv_transfer_config import KVTransferConfig
from kvtransfer.connector import ConnectorUnavailableError
from kvtransfer.factory import create_connector, default_connector_name
from kvtransfer.kv_cache_spec import KVCacheSpec
from kvtransfer.nixl_connector import NixlConnector
from kvtransfer.tcp_connector import TcpConnector

SPEC = KVCacheSpec("m", "float32", num_kv_heads=1, head_size=4, num_layers=1, block_size=2)


def config(**fields) -> KVTransferConfig:
    return KVTransferConfig.from_dict(fields)


@pytest.fixture
def without_nixl(monkeypatch):
    """As on a machine where no NIXL package imports."""
    monkeypatch.setattr(nixl_connector, "NIXL_API_MODULES", ("no_such_nixl._api",))
    nixl_connector.import_nixl_api.cache_clear()
    yield
    nixl_connector.import_nixl_api.cache_clear()


@pytest.mark.parametrize(("name", "cls"), [("TcpConnector", TcpConnector), ("NixlConnector", NixlConnector)])
@pytest.mark.parametrize("role", ["kv_producer", "kv_consumer", "kv_both"])
def test_each_shipped_connector_is_built_for_each_role(name, cls, role):
    connector = create_connector(config(kv_connector=name, kv_role=role, kv_port=0), None, SPEC)
    try:
        assert type(connector) is cls
        assert connector.role == role
        assert connector.is_producer == (role != "kv_consumer")
        assert connector.is_consumer == (role != "kv_producer")
    finally:
        connector.close()


def test_nixl_is_the_default_connector_where_it_imports():
    assert default_connector_name() == "NixlConnector"  # the test extra installs nixl-cu12


def test_tcp_is_the_default_connector_where_nixl_does_not_import(without_nixl):
    assert default_connector_name() == "TcpConnector"


def test_nixl_connector_without_nixl_says_what_to_install(without_nixl):
    with pytest.raises(ConnectorUnavailableError, match="pip install nixl-cu12"):
        create_connector(config(kv_connector="NixlConnector", kv_role="kv_consumer"), None, SPEC)


def test_multi_connector_uses_the_first_connector_that_runs_here(without_nixl):
    multi = config(
        kv_connector="MultiConnector",
        kv_role="kv_consumer",
        kv_connector_extra_config={
            "connectors": [
                {"kv_connector": "NixlConnector"},
                {"kv_connector": "TcpConnector", "kv_connector_extra_config": {"transfer_timeout_s": 3}},
            ]
        },
    )
    connector = create_connector(multi, None, SPEC)
    try:
        assert type(connector) is TcpConnector
        assert connector.transfer_timeout_s == 3
        assert connector.config.engine_id == multi.engine_id  # inherited from the parent
    finally:
        connector.close()


def test_multi_connector_with_nothing_runnable_lists_every_reason(without_nixl):
    multi = config(
        kv_connector="MultiConnector",
        kv_role="kv_consumer",
        kv_connector_extra_config={"connectors": [{"kv_connector": "NixlConnector"}]},
    )
    with pytest.raises(ConnectorUnavailableError, match=r"connectors\[0\] NixlConnector: .*nixl-cu12"):
        create_connector(multi, None, SPEC)


def test_an_out_of_tree_connector_is_loaded_from_its_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_kv_plugin.py").write_text(
        textwrap.dedent(
            """
            from kvtransfer.tcp_connector import TcpConnector

            class MyConnector(TcpConnector):
                name = "MyConnector"

            class NotAConnector:
                pass
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        connector = create_connector(
            config(
                kv_connector="MyConnector", kv_role="kv_consumer", kv_connector_module_path="my_kv_plugin"
            ),
            None,
            SPEC,
        )
        assert type(connector).__name__ == "MyConnector"
        connector.close()
        missing = r"my_kv_plugin\.NotAConnector does not implement .*KVConnector: it lacks is_producer, is_consumer, "
        with pytest.raises(ValueError, match=missing + r".*notify_done"):
            create_connector(
                config(
                    kv_connector="NotAConnector",
                    kv_role="kv_consumer",
                    kv_connector_module_path="my_kv_plugin",
                ),
                None,
                SPEC,
            )
        with pytest.raises(ConnectorUnavailableError, match="cannot import"):
            create_connector(
                config(
                    kv_connector="X", kv_role="kv_consumer", kv_connector_module_path="no_such_module_here"
                ),
                None,
                SPEC,
            )
    finally:
        sys.modules.pop("my_kv_plugin", None)


def test_a_connector_needs_a_name_and_a_role():
    with pytest.raises(ValueError, match="names no kv_connector"):
        create_connector(config(kv_role="kv_producer"), None, SPEC)
    with pytest.raises(ValueError, match="needs a role"):
        create_connector(KVTransferConfig(kv_connector="TcpConnector"), None, SPEC)


def test_the_role_argument_overrides_the_configured_one():
    connector = create_connector(config(kv_connector="TcpConnector", kv_role="kv_both"), "kv_consumer", SPEC)
    try:
        assert connector.role == "kv_consumer" and not connector.is_producer
        with pytest.raises(RuntimeError, match="export_blocks is for producers"):
            connector.export_blocks("r", [1], 2)
    finally:
        connector.close()


@pytest.mark.parametrize(
    ("extra", "complaint"),
    [
        ({"kv_lease_duration": "30"}, "kv_lease_duration must be a positive number"),
        ({"transfer_timeout_s": 0}, "transfer_timeout_s must be a positive number"),
        ({"tcp_chunk_bytes": 1.5}, "tcp_chunk_bytes must be a positive integer"),
        ({"side_channel_host": 7}, "side_channel_host must be a non-empty string"),
    ],
)
def test_bad_extra_config_values_are_refused_naming_the_key(extra, complaint):
    with pytest.raises(ValueError, match=complaint):
        create_connector(
            config(kv_connector="TcpConnector", kv_role="kv_both", kv_connector_extra_config=extra),
            None,
            SPEC,
        )


def test_a_producer_port_in_use_fails_with_advice():
    first = create_connector(
        config(kv_connector="TcpConnector", kv_role="kv_producer", kv_port=0), None, SPEC
    )
    first.register_kv_cache(torch.zeros(SPEC.kv_cache_shape(4)))
    taken = first.side_channel_address[1]
    second = create_connector(
        config(kv_connector="TcpConnector", kv_role="kv_producer", kv_port=taken), None, SPEC
    )
    try:
        with pytest.raises(RuntimeError, match="give each producer its own kv_port"):
            second.register_kv_cache(torch.zeros(SPEC.kv_cache_shape(4)))
    finally:
        second.close()
        first.close()


def test_a_worker_role_builds_its_connector_through_the_one_factory():
    from common.kv_connector import missing_members
    from kvtransfer.factory import WORKER_CONNECTORS
    from prefill_worker.role import PREFILL_ROLE

    assert WORKER_CONNECTORS.default_name() == default_connector_name()
    connector = WORKER_CONNECTORS.build(
        config(kv_connector="TcpConnector", kv_role="kv_consumer"), SPEC.to_dict(), 1
    )
    try:
        assert connector.is_consumer and not connector.is_producer
        assert missing_members(type(connector)) == []
    finally:
        connector.close()
    assert PREFILL_ROLE.connectors is WORKER_CONNECTORS
