"""`pdserve prefill`: its flags and its KV-transfer role."""

from __future__ import annotations

from common.config.kv_transfer_config import KVTransferConfig
from common.worker.role import kv_transfer_config_for
from kvtransfer.factory import default_connector_name
from pdserve.cli.main import main
from prefill_worker.role import PREFILL_ROLE


def test_without_kv_transfer_config_it_exports_with_the_best_connector_here():
    config = kv_transfer_config_for(None, PREFILL_ROLE)
    assert config.kv_role == "kv_producer" and config.kv_connector == default_connector_name()


def test_a_config_that_names_no_connector_or_role_gets_the_defaults_and_keeps_the_rest():
    given = KVTransferConfig.from_dict({"kv_port": 0, "kv_connector_extra_config": {"kv_lease_duration": 5}})
    config = kv_transfer_config_for(given, PREFILL_ROLE)
    assert config.kv_role == "kv_producer" and config.kv_connector == default_connector_name()
    assert config.kv_port == 0 and config.kv_connector_extra_config == {"kv_lease_duration": 5}
    assert config.engine_id == given.engine_id


def test_a_consumer_role_is_refused_before_anything_loads(capsys):
    status = main(
        ["prefill", "--kv-transfer-config", '{"kv_connector":"TcpConnector","kv_role":"kv_consumer"}']
    )
    assert status == 2
    assert "kv_producer or kv_both" in capsys.readouterr().err


def test_help_lists_the_worker_flags(capsys):
    assert main(["prefill", "-h"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--worker-address",
        "--metrics-port",
        "--ready-file",
        "--kv-transfer-config",
        "--max-num-seqs",
    ):
        assert flag in out
    assert "tcp://127.0.0.1:8100" in out
