"""The engine flags: vLLM's names, defaults, value syntax and one-line errors."""

from __future__ import annotations

import argparse

import pytest

from common.config.arg_parser import PdserveArgumentParser
from common.config.engine_args import TRUST_REMOTE_CODE_REFUSAL, add_engine_args, engine_config_from_args
from common.config.engine_config import EngineConfig
from common.config.kv_events_config import KVEventsConfig
from common.config.kv_transfer_config import KVTransferConfig


def engine_parser() -> PdserveArgumentParser:
    parser = PdserveArgumentParser(prog="pdserve serve")
    add_engine_args(parser)
    return parser


def parse(*argv: str) -> argparse.Namespace:
    return engine_parser().parse_args(list(argv))


def parse_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Parse a bad command line; return the one line it printed, after checking exit status 2."""
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), f"expected one line, got {err!r}"
    assert err.startswith("pdserve serve: error: ")
    return err.strip()


def test_defaults_are_vllms() -> None:
    ns = parse()
    expected = {
        "model": None,
        "tokenizer": None,
        "revision": None,
        "tokenizer_revision": None,
        "dtype": "auto",
        "seed": 0,
        "max_model_len": None,
        "served_model_name": None,
        "load_format": "auto",
        "download_dir": None,
        "hf_config_path": None,
        "generation_config": "auto",
        "override_generation_config": {},
        "chat_template": None,
        "block_size": None,
        "gpu_memory_utilization": 0.9,
        "kv_cache_memory_bytes": None,
        "num_gpu_blocks_override": None,
        "kv_cache_dtype": "auto",
        "enable_prefix_caching": None,
        "prefix_caching_hash_algo": None,  # unset: the engine's sha256 (below), the router's learned one
        "max_num_batched_tokens": None,
        "max_num_seqs": None,
        "enable_chunked_prefill": None,
        "long_prefill_token_threshold": 0,
        "max_num_partial_prefills": 1,
        "max_long_partial_prefills": 1,
        "scheduling_policy": "fcfs",
        "enforce_eager": False,
        "max_logprobs": 20,
        "tensor_parallel_size": 1,
        "kv_transfer_config": None,
        "kv_events_config": None,
        "device": "auto",
        "disable_log_stats": False,
        "trust_remote_code": False,
        "config": None,
    }
    assert {k: getattr(ns, k) for k in expected} == expected
    assert engine_config_from_args(ns).prefix_caching_hash_algo == "sha256"


@pytest.mark.parametrize(
    ("argv", "dest", "value"),
    [
        (["--model", "/models/llama"], "model", "/models/llama"),
        (["--tokenizer", "/models/tok"], "tokenizer", "/models/tok"),
        (["--revision", "v1.0"], "revision", "v1.0"),
        (["--tokenizer-revision", "abc123"], "tokenizer_revision", "abc123"),
        (["--dtype", "bfloat16"], "dtype", "bfloat16"),
        (["--dtype", "half"], "dtype", "half"),
        (["--seed", "-7"], "seed", -7),
        (["--max-model-len", "4096"], "max_model_len", 4096),
        (["--served-model-name", "a", "b"], "served_model_name", ["a", "b"]),
        (["--load-format", "gguf"], "load_format", "gguf"),
        (["--load-format", "dummy"], "load_format", "dummy"),
        (["--download-dir", "/tmp/w"], "download_dir", "/tmp/w"),
        (["--hf-config-path", "/cfg"], "hf_config_path", "/cfg"),
        (["--generation-config", "vllm"], "generation_config", "vllm"),
        (
            ["--override-generation-config", '{"temperature": 0.5}'],
            "override_generation_config",
            {"temperature": 0.5},
        ),
        (["--chat-template", "{{ messages }}"], "chat_template", "{{ messages }}"),
        (["--block-size", "32"], "block_size", 32),
        (["--gpu-memory-utilization", "0.5"], "gpu_memory_utilization", 0.5),
        (["--gpu-memory-utilization", "1"], "gpu_memory_utilization", 1.0),
        (["--kv-cache-memory-bytes", "1G"], "kv_cache_memory_bytes", 2**30),
        (["--kv-cache-memory-bytes", "512M"], "kv_cache_memory_bytes", 512 * 2**20),
        (["--num-gpu-blocks-override", "64"], "num_gpu_blocks_override", 64),
        (["--kv-cache-dtype", "fp8"], "kv_cache_dtype", "fp8"),
        (["--kv-cache-dtype", "fp8_e4m3"], "kv_cache_dtype", "fp8_e4m3"),
        (["--enable-prefix-caching"], "enable_prefix_caching", True),
        (["--no-enable-prefix-caching"], "enable_prefix_caching", False),
        (["--prefix-caching-hash-algo", "sha256_cbor"], "prefix_caching_hash_algo", "sha256_cbor"),
        (["--prefix-caching-hash-algo", "xxhash_cbor"], "prefix_caching_hash_algo", "xxhash_cbor"),
        (["--max-num-batched-tokens", "16"], "max_num_batched_tokens", 16),
        (["--max-num-batched-tokens", "8k"], "max_num_batched_tokens", 8000),
        (["--max-num-seqs", "32"], "max_num_seqs", 32),
        (["--enable-chunked-prefill"], "enable_chunked_prefill", True),
        (["--no-enable-chunked-prefill"], "enable_chunked_prefill", False),
        (["--long-prefill-token-threshold", "256"], "long_prefill_token_threshold", 256),
        (["--max-num-partial-prefills", "4"], "max_num_partial_prefills", 4),
        (
            ["--max-num-partial-prefills", "4", "--max-long-partial-prefills", "2"],
            "max_long_partial_prefills",
            2,
        ),
        (["--scheduling-policy", "priority"], "scheduling_policy", "priority"),
        (["--enforce-eager"], "enforce_eager", True),
        (["--max-logprobs", "-1"], "max_logprobs", -1),
        (["--tensor-parallel-size", "2"], "tensor_parallel_size", 2),
        (["-tp", "4"], "tensor_parallel_size", 4),
        (["--device", "cpu"], "device", "cpu"),
        (["--disable-log-stats"], "disable_log_stats", True),
        (["--no-trust-remote-code"], "trust_remote_code", False),
    ],
)
def test_flag_sets_its_value(argv: list[str], dest: str, value: object) -> None:
    assert getattr(parse(*argv), dest) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1k", 1000),
        ("1K", 1024),
        ("25.6k", 25600),
        ("1m", 10**6),
        ("1M", 2**20),
        ("2g", 2 * 10**9),
        ("1G", 2**30),
        ("32768", 32768),
        (" 8k ", 8000),
    ],
)
def test_max_model_len_accepts_vllm_size_suffixes(text: str, value: int) -> None:
    assert parse("--max-model-len", text).max_model_len == value


@pytest.mark.parametrize("text", ["abc", "1.5K", "1.0005k", "0", "-5", "1kk", "k"])
def test_max_model_len_refuses_bad_sizes_in_one_line(capsys: pytest.CaptureFixture[str], text: str) -> None:
    line = parse_error(capsys, "--max-model-len", text)
    assert "argument --max-model-len:" in line
    assert repr(text) in line


def test_binary_suffix_with_decimals_suggests_the_decimal_suffix(capsys: pytest.CaptureFixture[str]) -> None:
    assert "did you mean 1.5k?" in parse_error(capsys, "--max-model-len", "1.5K")


@pytest.mark.parametrize(
    ("argv", "flag", "allowed"),
    [
        (["--block-size", "7"], "--block-size", "invalid choice: '7' (choose from 1, 8, 16, 32, 64, 128)"),
        (["--block-size", "big"], "--block-size", "(choose from 1, 8, 16, 32, 64, 128)"),
        (["--dtype", "fp64"], "--dtype", "(choose from auto, half, float16, bfloat16, float, float32)"),
        (["--load-format", "pt"], "--load-format", "(choose from auto, safetensors, gguf, dummy)"),
        (
            ["--kv-cache-dtype", "int4"],
            "--kv-cache-dtype",
            "(choose from auto, bfloat16, float16, float32, fp8, fp8_e4m3)",
        ),
        (
            ["--prefix-caching-hash-algo", "md5"],
            "--prefix-caching-hash-algo",
            "sha256, sha256_cbor, xxhash, xxhash_cbor",
        ),
        (["--scheduling-policy", "lifo"], "--scheduling-policy", "(choose from fcfs, priority)"),
        (["--device", "tpu"], "--device", "(choose from auto, cpu, cuda)"),
        (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization", "greater than 0 and at most 1"),
        (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization", "greater than 0 and at most 1"),
        (["--gpu-memory-utilization", "most"], "--gpu-memory-utilization", "greater than 0 and at most 1"),
        (["--kv-cache-memory-bytes", "lots"], "--kv-cache-memory-bytes", "K/M/G"),
        (["--max-num-seqs", "0"], "--max-num-seqs", ">= 1"),
        (["--max-num-seqs", "x"], "--max-num-seqs", ">= 1"),
        (["--num-gpu-blocks-override", "0"], "--num-gpu-blocks-override", ">= 1"),
        (["--long-prefill-token-threshold", "-1"], "--long-prefill-token-threshold", ">= 0"),
        (["--max-logprobs", "-2"], "--max-logprobs", ">= -1"),
        (["-tp", "0"], "--tensor-parallel-size", ">= 1"),
        (["--seed", "1.5"], "--seed", "integer"),
        (
            ["--override-generation-config", "{temperature: 1}"],
            "--override-generation-config",
            "invalid JSON",
        ),
        (["--override-generation-config", "[1, 2]"], "--override-generation-config", "JSON object"),
    ],
)
def test_bad_value_exits_2_with_one_line_naming_flag_and_allowed(
    capsys: pytest.CaptureFixture[str], argv: list[str], flag: str, allowed: str
) -> None:
    line = parse_error(capsys, *argv)
    assert f"argument {flag}" in line
    assert allowed in line


def test_block_size_error_reads_like_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_error(capsys, "--block-size", "7") == (
        "pdserve serve: error: argument --block-size: invalid choice: '7' (choose from 1, 8, 16, 32, 64, 128)"
    )


def test_unknown_flag_and_abbreviation_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert "unrecognized arguments: --max-model 10" in parse_error(capsys, "--max-model", "10")
    assert "unrecognized arguments: --no-such-flag" in parse_error(capsys, "--no-such-flag")


def test_underscored_option_names_work_like_dashed_ones() -> None:
    ns = parse("--max_model_len", "2k", "--gpu_memory_utilization=0.5", "--no_enable_prefix_caching")
    assert (ns.max_model_len, ns.gpu_memory_utilization, ns.enable_prefix_caching) == (2000, 0.5, False)


def test_trust_remote_code_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    line = parse_error(capsys, "--trust-remote-code")
    assert line == f"pdserve serve: error: {TRUST_REMOTE_CODE_REFUSAL}"
    assert "--trust-remote-code is not supported: pdserve never runs code from a model repository" in line


def test_every_flag_has_help() -> None:
    parser = engine_parser()
    missing = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert missing == []


def test_partial_prefill_limits_are_checked_together(capsys: pytest.CaptureFixture[str]) -> None:
    line = parse_error(capsys, "--max-long-partial-prefills", "2")
    assert "--max-long-partial-prefills" in line and "--max-num-partial-prefills 1" in line
    line = parse_error(capsys, "--max-num-partial-prefills", "2", "--no-enable-chunked-prefill")
    assert "--max-num-partial-prefills" in line and "chunked prefill" in line


def test_add_engine_args_needs_a_pdserve_parser() -> None:
    with pytest.raises(TypeError, match="PdserveArgumentParser"):
        add_engine_args(argparse.ArgumentParser())


def test_engine_config_from_args_carries_every_flag() -> None:
    ns = parse(
        "--model", "m.gguf", "--dtype", "half", "--max-model-len", "1K", "--block-size", "16",
        "--no-enable-prefix-caching", "--max-num-batched-tokens", "16", "--scheduling-policy", "priority",
        "--served-model-name", "x", "--kv-transfer-config.kv_connector", "TcpConnector",
        "--kv-transfer-config.kv_role", "kv_producer", "--kv-events-config.enable_kv_cache_events", "true",
        "--device", "cpu",
    )  # fmt: skip
    config = engine_config_from_args(ns)
    assert isinstance(config, EngineConfig)
    assert config.model == "m.gguf"
    assert config.dtype == "float16"  # half is an alias
    assert config.max_model_len == 1024
    assert config.block_size == 16
    assert config.enable_prefix_caching is False
    assert config.max_num_batched_tokens == 16
    assert config.scheduling_policy == "priority"
    assert config.served_model_name == ["x"]
    assert config.device == "cpu"
    assert isinstance(config.kv_transfer_config, KVTransferConfig)
    assert config.kv_transfer_config.kv_connector == "TcpConnector"
    assert config.kv_transfer_config.is_kv_producer and not config.kv_transfer_config.is_kv_consumer
    assert isinstance(config.kv_events_config, KVEventsConfig)
    assert config.kv_events_config.publisher == "zmq"


def test_engine_config_from_args_float_alias_and_defaults() -> None:
    config = engine_config_from_args(parse("--dtype", "float"))
    assert config.dtype == "float32"
    assert config.kv_transfer_config is None and config.kv_events_config is None
    assert engine_config_from_args(argparse.Namespace()) == EngineConfig()


def test_engine_config_does_not_share_the_parsers_default_objects() -> None:
    parser = engine_parser()
    first = engine_config_from_args(parser.parse_args([]))
    first.override_generation_config["temperature"] = 0.1
    assert parser.parse_args([]).override_generation_config == {}


def test_engine_config_from_args_converts_hand_made_dicts() -> None:
    ns = argparse.Namespace(kv_transfer_config={"kv_connector": "NixlConnector", "kv_role": "kv_consumer"})
    config = engine_config_from_args(ns)
    assert isinstance(config.kv_transfer_config, KVTransferConfig)
    assert config.kv_transfer_config.is_kv_consumer
