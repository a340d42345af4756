"""--kv-transfer-config and --kv-events-config: vLLM's fields, defaults and checks."""

from __future__ import annotations

import uuid

import pytest

from common.config.arg_parser import PdserveArgumentParser
from common.config.engine_args import add_engine_args
from common.config.kv_events_config import KVEventsConfig
from common.config.kv_transfer_config import KNOWN_KV_CONNECTORS, KVTransferConfig


def parse_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    parser = PdserveArgumentParser(prog="pdserve decode")
    add_engine_args(parser)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


# --- kv-transfer-config ---------------------------------------------------------------


def test_kv_transfer_defaults_are_vllms() -> None:
    config = KVTransferConfig.from_dict({"kv_connector": "NixlConnector", "kv_role": "kv_both"})
    assert config.kv_buffer_device is None
    assert config.kv_buffer_size == 1e9
    assert config.kv_ip == "127.0.0.1"
    assert config.kv_port == 14579
    assert config.kv_rank is None and config.kv_parallel_size == 1
    assert config.kv_connector_extra_config == {}
    assert config.kv_connector_module_path is None
    assert config.kv_load_failure_policy == "fail"
    assert uuid.UUID(config.engine_id).version == 4


def test_each_config_gets_its_own_engine_id_unless_given() -> None:
    a, b = KVTransferConfig.from_dict({}), KVTransferConfig.from_dict({"engine_id": None})
    assert a.engine_id != b.engine_id
    assert KVTransferConfig.from_dict({"engine_id": "prefill-0"}).engine_id == "prefill-0"


def test_roles_say_producer_or_consumer() -> None:
    def roles(role: str) -> tuple[bool, bool]:
        config = KVTransferConfig.from_dict({"kv_connector": "TcpConnector", "kv_role": role})
        return config.is_kv_producer, config.is_kv_consumer

    assert roles("kv_producer") == (True, False)
    assert roles("kv_consumer") == (False, True)
    assert roles("kv_both") == (True, True)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kv_connector": "NixlConnector", "kv_role": "kv_master"}, "Unsupported kv_role 'kv_master'"),
        ({"kv_connector": "NixlConnector"}, "kv_connector NixlConnector needs a kv_role"),
        ({"kv_connector": "Nope", "kv_role": "kv_both"}, "unknown kv_connector 'Nope'; known connectors: "
         + ", ".join(KNOWN_KV_CONNECTORS)),
        ({"kv_load_failure_policy": "retry"}, "Unsupported kv_load_failure_policy 'retry'; choose from fail, recompute"),
        ({"kv_buffer_device": "tpu"}, "Unsupported kv_buffer_device 'tpu'; choose from cuda, cpu"),
        ({"kv_port": "14579"}, "kv_port must be an integer"),
        ({"kv_port": 70000}, "kv_port must be between 0 and 65535"),
        ({"kv_parallel_size": 0}, "kv_parallel_size must be >= 1"),
        ({"kv_buffer_size": -1}, "kv_buffer_size must be positive"),
        ({"kv_connector_extra_config": [1]}, "kv_connector_extra_config must be a JSON object"),
        ({"engine_id": ""}, "engine_id must not be empty"),
        ({"kv_rol": "kv_both"}, "unknown field 'kv_rol'; known fields: kv_connector, engine_id"),
        ({"kv_connector": "MultiConnector", "kv_role": "kv_both"}, "MultiConnector needs kv_connector_extra_config.connectors"),
        ({"kv_connector": "MultiConnector", "kv_role": "kv_both",
          "kv_connector_extra_config": {"connectors": [{"kv_connector": "Nope"}]}},
         "kv_connector_extra_config.connectors[0]: unknown kv_connector 'Nope'"),
    ],
)  # fmt: skip
def test_kv_transfer_config_refuses_bad_fields(data: dict, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        KVTransferConfig.from_dict(data)
    assert message in str(exc.value)


def test_out_of_tree_connector_needs_a_module_path() -> None:
    config = KVTransferConfig.from_dict(
        {"kv_connector": "MyConnector", "kv_role": "kv_both", "kv_connector_module_path": "my_pkg.conn"}
    )
    assert config.kv_connector == "MyConnector"


def test_multi_connector_takes_a_list_of_connector_configs() -> None:
    data = {
        "kv_connector": "MultiConnector",
        "kv_role": "kv_consumer",
        "kv_connector_extra_config": {
            "connectors": [
                {"kv_connector": "NixlConnector"},
                {"kv_connector": "TcpConnector", "kv_port": 15000},
            ]
        },
    }
    config = KVTransferConfig.from_dict(data)
    assert config.kv_connector_extra_config["connectors"][1]["kv_port"] == 15000


def test_kv_transfer_errors_on_the_command_line_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    line = parse_error(
        capsys, "--kv-transfer-config", '{"kv_connector": "NixlConnector", "kv_role": "leader"}'
    )
    assert line.startswith(
        "pdserve decode: error: argument --kv-transfer-config: Unsupported kv_role 'leader'"
    )
    line = parse_error(capsys, "--kv-transfer-config.kv_connector", "NixlConnector")
    assert "argument --kv-transfer-config: kv_connector NixlConnector needs a kv_role" in line
    line = parse_error(
        capsys, "--kv-transfer-config.kv_connector", "Foo", "--kv-transfer-config.kv_role", "kv_both"
    )
    assert "known connectors: NixlConnector, TcpConnector, MultiConnector" in line


def test_kv_transfer_config_round_trips_through_a_dict() -> None:
    config = KVTransferConfig.from_dict(
        {"kv_connector": "TcpConnector", "kv_role": "kv_producer", "kv_port": 1}
    )
    assert KVTransferConfig.from_dict(config.to_dict()) == config


# --- kv-events-config -----------------------------------------------------------------


def test_kv_events_defaults_are_vllms() -> None:
    config = KVEventsConfig.from_dict({})
    assert config == KVEventsConfig(
        enable_kv_cache_events=False,
        publisher="null",
        endpoint="tcp://*:5557",
        replay_endpoint=None,
        buffer_steps=10000,
        hwm=100000,
        max_queue_size=100000,
        topic="",
    )


def test_kv_events_publisher_is_zmq_once_enabled_unless_given() -> None:
    assert KVEventsConfig.from_dict({"enable_kv_cache_events": True}).publisher == "zmq"
    assert KVEventsConfig.from_dict({"enable_kv_cache_events": True, "publisher": "null"}).publisher == "null"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"publisher": "kafka"}, "Unsupported publisher 'kafka'; choose from zmq, null"),
        ({"endpoint": "localhost:5557"}, "endpoint 'localhost:5557' must be a ZMQ address"),
        ({"replay_endpoint": 5558}, "replay_endpoint must be a string"),
        ({"buffer_steps": -1}, "buffer_steps must be >= 0"),
        ({"max_queue_size": 0}, "max_queue_size must be >= 1"),
        ({"hwm": "big"}, "hwm must be an integer"),
        ({"enable_kv_cache_events": "yes"}, "enable_kv_cache_events must be true or false"),
        ({"topic": 3}, "topic must be a string"),
        ({"endpoints": "tcp://*:1"}, "unknown field 'endpoints'"),
    ],
)
def test_kv_events_config_refuses_bad_fields(data: dict, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        KVEventsConfig.from_dict(data)
    assert message in str(exc.value)


def test_kv_events_config_from_dotted_flags() -> None:
    parser = PdserveArgumentParser(prog="pdserve prefill")
    add_engine_args(parser)
    ns = parser.parse_args(
        ["--kv-events-config.enable_kv_cache_events", "true", "--kv-events-config.endpoint", "tcp://*:6000",
         "--kv-events-config.replay_endpoint", "tcp://*:6001", "--kv-events-config.topic", "kv"]
    )  # fmt: skip
    config = ns.kv_events_config
    assert (config.publisher, config.endpoint, config.replay_endpoint, config.topic) == (
        "zmq", "tcp://*:6000", "tcp://*:6001", "kv",
    )  # fmt: skip
    assert config.buffer_steps == 10000


def test_kv_events_errors_on_the_command_line_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    line = parse_error(capsys, "--kv-events-config", '{"publisher": "kafka"}')
    assert line == (
        "pdserve decode: error: argument --kv-events-config: Unsupported publisher 'kafka'; choose from zmq, null"
    )
