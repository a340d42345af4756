"""`pdserve decode`: its flags and its KV-transfer role."""

from __future__ import annotations

import pytest

from common.config.kv_transfer_config import KVTransferConfig
from common.worker.role import kv_transfer_config_for
from decode_worker.role import DECODE_ROLE
from kvtransfer.factory import default_connector_name
from pdserve.cli.main import main


def test_without_kv_transfer_config_it_pulls_with_the_best_connector_here():
    config = kv_transfer_config_for(None, DECODE_ROLE)
    assert config.kv_role == "kv_consumer" and config.kv_connector == default_connector_name()
    assert config.kv_load_failure_policy == "fail"  # vLLM's default


@pytest.mark.parametrize("role", ["kv_consumer", "kv_both"])
def test_consumer_roles_are_kept(role):
    given = KVTransferConfig.from_dict(
        {"kv_connector": "TcpConnector", "kv_role": role, "kv_load_failure_policy": "recompute"}
    )
    config = kv_transfer_config_for(given, DECODE_ROLE)
    assert (config.kv_role, config.kv_connector, config.kv_load_failure_policy) == (
        role,
        "TcpConnector",
        "recompute",
    )


def test_a_producer_role_is_refused_before_anything_loads(capsys):
    status = main(
        ["decode", "--kv-transfer-config", '{"kv_connector":"TcpConnector","kv_role":"kv_producer"}']
    )
    assert status == 2
    assert "kv_consumer or kv_both" in capsys.readouterr().err


def test_help_lists_the_worker_flags(capsys):
    assert main(["decode", "-h"]) == 0
    out = capsys.readouterr().out
    assert "--worker-address" in out and "tcp://127.0.0.1:8200" in out
