"""JSON options given whole, by dotted keys, and with `+` list items (vLLM serve docs, 2.1.1)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.cli.engine_flag_parsing import parse, parse_error

REPO = Path(__file__).resolve().parents[2]
FLAG = "--override-generation-config"  # a JSON option with no field checks of its own


@pytest.fixture(scope="module")
def shell_parse(tmp_path_factory: pytest.TempPathFactory):
    """Parse a command line written as in a shell (quotes and all), in a real process."""
    script = tmp_path_factory.mktemp("json_args") / "parse.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys
            from common.config.arg_parser import PdserveArgumentParser
            from common.config.engine_args import add_engine_args
            parser = PdserveArgumentParser(prog="pdserve serve")
            add_engine_args(parser)
            print(json.dumps(parser.parse_args(sys.argv[1:]).override_generation_config))
            """
        )
    )

    def run(command_line: str) -> object:
        proc = subprocess.run(
            ["bash", "-c", f"{sys.executable} {script} {command_line}"],
            capture_output=True, text=True, cwd=REPO, check=True,
        )  # fmt: skip
        return json.loads(proc.stdout)

    return run


def test_seed_example_dotted_keys_equal_the_whole_json(shell_parse) -> None:
    whole = shell_parse(
        """--json-arg '{"key1": "value1", "key2": {"key3": "value2"}}'""".replace("--json-arg", FLAG)
    )
    dotted = shell_parse("--json-arg.key1 value1 --json-arg.key2.key3 value2".replace("--json-arg", FLAG))
    assert whole == dotted == {"key1": "value1", "key2": {"key3": "value2"}}


def test_seed_example_plus_list_items_equal_the_whole_json(shell_parse) -> None:
    whole = shell_parse(
        """--json-arg '{"key4": ["value3", "value4", "value5"]}'""".replace("--json-arg", FLAG)
    )
    items = shell_parse(
        "--json-arg.key4+ value3 --json-arg.key4+='value4,value5'".replace("--json-arg", FLAG)
    )
    assert whole == items == {"key4": ["value3", "value4", "value5"]}


def test_plus_items_after_the_shell_removed_quotes() -> None:
    ns = parse(f"{FLAG}.key4+", "value3", f"{FLAG}.key4+=value4,value5")
    assert ns.override_generation_config == {"key4": ["value3", "value4", "value5"]}


@pytest.mark.parametrize(
    ("raw", "value"),
    [("8", 8), ("0.5", 0.5), ("true", True), ("null", None), ("abc", "abc"), ('"8"', "8"), ("[1, 2]", [1, 2]),
     ('{"a": 1}', {"a": 1}), ("tcp://*:5557", "tcp://*:5557")],
)  # fmt: skip
def test_dotted_values_are_json_when_they_parse_else_strings(raw: str, value: object) -> None:
    assert parse(f"{FLAG}.k", raw).override_generation_config == {"k": value}
    assert parse(f"{FLAG}.k={raw}").override_generation_config == {"k": value}


def test_dotted_keys_merge_over_the_whole_object_in_any_order() -> None:
    expected = {"temperature": 0.5, "top_k": 5, "nested": {"a": 1, "b": 2}}
    before = parse(
        f"{FLAG}.top_k", "5", FLAG, '{"temperature": 0.5, "nested": {"a": 1}}', f"{FLAG}.nested.b", "2"
    )
    after = parse(
        FLAG, '{"temperature": 0.5, "nested": {"a": 1}}', f"{FLAG}.top_k", "5", f"{FLAG}.nested.b", "2"
    )
    assert before.override_generation_config == after.override_generation_config == expected


def test_plus_items_extend_a_list_from_the_whole_object() -> None:
    ns = parse(FLAG, '{"stop": ["a"]}', f"{FLAG}.stop+", "b,c")
    assert ns.override_generation_config == {"stop": ["a", "b", "c"]}


def test_a_later_dotted_key_wins() -> None:
    assert parse(f"{FLAG}.k", "1", f"{FLAG}.k", "2").override_generation_config == {"k": 2}


def test_underscored_json_flag_names_keep_underscored_keys() -> None:
    ns = parse(
        "--kv_transfer_config.kv_role",
        "kv_producer",
        "--kv-transfer-config.kv_connector_extra_config.num_threads",
        "8",
    )
    assert ns.kv_transfer_config.kv_role == "kv_producer"
    assert ns.kv_transfer_config.kv_connector_extra_config == {"num_threads": 8}


def test_kv_transfer_config_dotted_as_in_the_docs() -> None:
    ns = parse(
        "--kv-transfer-config.kv_connector", "NixlConnector",
        "--kv-transfer-config.kv_role", "kv_producer",
        "--kv-transfer-config.kv_connector_extra_config.num_threads", "8",
        "--kv-transfer-config.kv_connector_extra_config.backends+", "UCX",
    )  # fmt: skip
    config = ns.kv_transfer_config
    assert (config.kv_connector, config.kv_role) == ("NixlConnector", "kv_producer")
    assert config.kv_connector_extra_config == {"num_threads": 8, "backends": ["UCX"]}


def test_dotted_key_on_a_plain_flag_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    line = parse_error(capsys, "--max-model-len.x", "1")
    assert "argument --max-model-len: takes no dotted keys" in line
    assert "--kv-transfer-config" in line and "--override-generation-config" in line


def test_dotted_key_without_value_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert f"argument {FLAG}.k: expected one argument" in parse_error(capsys, f"{FLAG}.k")


def test_empty_dotted_key_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert "empty key" in parse_error(capsys, f"{FLAG}.a..b", "1")


def test_whole_json_that_is_not_an_object_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    line = parse_error(capsys, "--kv-events-config", '"on"')
    assert "argument --kv-events-config: expected a JSON object" in line
