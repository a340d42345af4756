"""`--config FILE.yaml`: option names as keys, command-line flags win, bad files fail in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.engine_flag_parsing import parse, parse_error


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "engine.yaml"
    path.write_text(text)
    return str(path)


CONFIG = """\
max-model-len: 4096
max_num_seqs: 8
block-size: 32
dtype: bfloat16
enable_prefix_caching: false
enforce-eager: true
served-model-name: [alpha, beta]
kv-cache-memory-bytes: 512M
kv-transfer-config:
  kv_connector: NixlConnector
  kv_role: kv_producer
  kv_connector_extra_config: {num_threads: 4}
"""


def test_config_file_sets_options(tmp_path: Path) -> None:
    ns = parse("--config", write(tmp_path, CONFIG))
    assert ns.max_model_len == 4096
    assert ns.max_num_seqs == 8
    assert ns.block_size == 32
    assert ns.dtype == "bfloat16"
    assert ns.enable_prefix_caching is False
    assert ns.enforce_eager is True
    assert ns.served_model_name == ["alpha", "beta"]
    assert ns.kv_cache_memory_bytes == 512 * 2**20
    assert ns.kv_transfer_config.kv_connector == "NixlConnector"
    assert ns.kv_transfer_config.kv_connector_extra_config == {"num_threads": 4}
    assert ns.config.endswith("engine.yaml")


def test_command_line_flags_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG)
    ns = parse(
        "--max-model-len", "2k", "--config", path, "--enable-prefix-caching", "--served-model-name", "gamma",
        "--kv-transfer-config.kv_role", "kv_both", "--kv-transfer-config.kv_connector_extra_config.num_threads", "8",
    )  # fmt: skip
    assert ns.max_model_len == 2000
    assert ns.enable_prefix_caching is True
    assert ns.served_model_name == ["gamma"]
    assert ns.max_num_seqs == 8  # only in the file
    assert ns.kv_transfer_config.kv_connector == "NixlConnector"  # from the file, merged
    assert ns.kv_transfer_config.kv_role == "kv_both"
    assert ns.kv_transfer_config.kv_connector_extra_config == {"num_threads": 8}


def test_whole_json_on_the_command_line_replaces_the_files_object(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG)
    ns = parse(
        "--config", path, "--kv-transfer-config", '{"kv_connector": "TcpConnector", "kv_role": "kv_consumer"}'
    )
    assert ns.kv_transfer_config.kv_connector == "TcpConnector"
    assert ns.kv_transfer_config.kv_connector_extra_config == {}


def test_config_equals_form_and_dotted_keys_and_suffixed_sizes(tmp_path: Path) -> None:
    path = write(tmp_path, "max_model_len: 32k\nkv-events-config.enable_kv_cache_events: true\n")
    ns = parse(f"--config={path}")
    assert ns.max_model_len == 32000
    assert ns.kv_events_config.enable_kv_cache_events is True
    assert ns.kv_events_config.publisher == "zmq"


def test_empty_file_changes_nothing(tmp_path: Path) -> None:
    assert vars(parse("--config", write(tmp_path, ""))) == {
        **vars(parse()),
        "config": str(tmp_path / "engine.yaml"),
    }


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("max-model-len: [4096\n", "not valid YAML (line 2"),
        ("- max-model-len\n- 4096\n", "expected a mapping of option names to values"),
        ("no-such-option: 1\n", "no-such-option: unknown option"),
        ("config: other.yaml\n", "config: unknown option"),
        ("help: true\n", "help: unknown option"),
        ("block-size: 7\n", "block-size: invalid choice: '7' (choose from 1, 8, 16, 32, 64, 128)"),
        ("max-model-len: lots\n", "max-model-len: invalid value 'lots'"),
        ("enable-prefix-caching: maybe\n", "enable-prefix-caching: expected true or false"),
        ("max-num-seqs: [1, 2]\n", "max-num-seqs: expected a single value"),
        ("model.name: x\n", "model.name: only JSON options take dotted keys"),
        ("kv-transfer-config: [1]\n", "kv-transfer-config: expected a mapping"),
        ("trust-remote-code: true\n", "trust-remote-code: --trust-remote-code is not supported"),
    ],
)
def test_bad_file_exits_2_with_one_line_naming_the_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, problem: str
) -> None:
    path = write(tmp_path, text)
    line = parse_error(capsys, "--config", path)
    assert line.startswith(f"pdserve serve: error: --config {path}: ")
    assert problem in line


def test_missing_file_is_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = str(tmp_path / "absent.yaml")
    line = parse_error(capsys, "--config", path)
    assert line.startswith(f"pdserve serve: error: --config {path}: cannot read the file")


def test_two_config_files_are_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert "--config given 2 times" in parse_error(capsys, "--config", path, "--config", path)


def test_trust_remote_code_false_in_a_file_is_fine(tmp_path: Path) -> None:
    assert parse("--config", write(tmp_path, "trust_remote_code: false\n")).trust_remote_code is False


def test_kv_config_problem_from_the_file_fails_after_merging(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write(tmp_path, "kv-transfer-config: {kv_connector: NixlConnector}\n")
    assert parse(
        "--config", path, "--kv-transfer-config.kv_role", "kv_consumer"
    ).kv_transfer_config.is_kv_consumer
    line = parse_error(capsys, "--config", path)
    assert "argument --kv-transfer-config: kv_connector NixlConnector needs a kv_role" in line
