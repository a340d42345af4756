"""--structured-outputs-config and --reasoning-parser: vLLM's fields and defaults, set whole
or by dotted keys, one-line errors, the flag winning over the config's reasoning_parser,
and both reaching the router and every worker that `pdserve serve` starts."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from common.config.arg_parser import PdserveArgumentParser
from common.config.engine_args import add_engine_args, engine_config_from_args
from common.config.structured_outputs_config import (
    REASONING_PARSERS,
    StructuredOutputsConfig,
    structured_outputs_config_from_args,
)
from common.worker.worker_args import add_worker_args
from pdserve.cli import serve
from pdserve.cli.serve import router_argv, worker_argv
from router.cli import add_router_args, config_from_args
from router.model_info import ModelSettings, load_served_model


def parser_of(add_args, prog: str = "pdserve x") -> PdserveArgumentParser:
    parser = PdserveArgumentParser(prog=prog)
    add_args(parser)
    return parser


def engine_config(*argv: str) -> StructuredOutputsConfig:
    return engine_config_from_args(
        parser_of(add_engine_args).parse_args(list(argv))
    ).structured_outputs_config


def router_config(*argv: str) -> StructuredOutputsConfig:
    return config_from_args(parser_of(add_router_args).parse_args(list(argv)))[1].structured_outputs


def one_line_error(capsys, add_args, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        parser_of(add_args, "pdserve x").parse_args(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pdserve x: error: "), err
    return err.strip()


def test_the_defaults_are_vllms():
    assert StructuredOutputsConfig() == StructuredOutputsConfig(
        backend="auto",
        disable_fallback=False,
        disable_any_whitespace=False,
        disable_additional_properties=False,
        reasoning_parser="",
        enable_in_reasoning=False,
    )
    for config in (engine_config(), router_config()):
        assert config == StructuredOutputsConfig()
    ns = parser_of(add_engine_args).parse_args([])
    assert (ns.structured_outputs_config, ns.reasoning_parser) == (None, None)  # unset: not handed on


@pytest.mark.parametrize("parse", [engine_config, router_config], ids=["engine", "router"])
def test_the_config_is_set_whole_or_key_by_key(parse):
    whole = parse("--structured-outputs-config", '{"backend": "guidance", "disable_any_whitespace": true}')
    assert (whole.backend, whole.disable_any_whitespace, whole.disable_additional_properties) == (
        "guidance",
        True,
        False,
    )
    dotted = parse(
        "--structured-outputs-config.disable_additional_properties", "true",
        "--structured-outputs-config.enable_in_reasoning", "true",
        "--structured-outputs-config.disable_fallback", "true",
        "--structured-outputs-config.reasoning_parser", "deepseek_r1",
    )  # fmt: skip
    assert dotted == StructuredOutputsConfig(
        disable_fallback=True,
        disable_additional_properties=True,
        reasoning_parser="deepseek_r1",
        enable_in_reasoning=True,
    )
    merged = parse(
        "--structured-outputs-config",
        '{"backend": "guidance"}',
        "--structured-outputs-config.backend",
        "auto",
    )
    assert merged.backend == "auto"


@pytest.mark.parametrize("add_args", [add_engine_args, add_router_args], ids=["engine", "router"])
@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--structured-outputs-config.colour", "red"], "unknown field 'colour'; known fields: backend,"),
        (["--structured-outputs-config", '{"guided_decoding_backend": "x"}'], "unknown field 'guided_decoding_backend'"),
        (["--structured-outputs-config.backend", "xgrammar"], "backend 'xgrammar' is not available here; use auto or guidance"),
        (["--structured-outputs-config.backend", "nope"], "unknown structured outputs backend 'nope'"),
        (["--structured-outputs-config.disable_any_whitespace", "yes"], "disable_any_whitespace must be true or false"),
        (["--structured-outputs-config.reasoning_parser", "granite"], "Unsupported reasoning_parser 'granite'"),
        (["--structured-outputs-config", "[1]"], "--structured-outputs-config"),
        (["--reasoning-parser", "granite"], "argument --reasoning-parser: invalid choice: 'granite'"),
    ],
)  # fmt: skip
def test_a_bad_value_is_one_line_naming_it(capsys, add_args, argv, words):
    line = one_line_error(capsys, add_args, *argv)
    assert words in line, line
    if argv[0].startswith("--structured-outputs-config"):
        assert "argument --structured-outputs-config" in line


@pytest.mark.parametrize("parse", [engine_config, router_config], ids=["engine", "router"])
def test_the_reasoning_parser_flag_wins_over_the_configs(parse):
    assert parse("--reasoning-parser", "qwen3").reasoning_parser == "qwen3"
    assert (
        parse("--structured-outputs-config.reasoning_parser", "deepseek_r1").reasoning_parser == "deepseek_r1"
    )
    both = parse("--structured-outputs-config.reasoning_parser", "deepseek_r1", "--reasoning-parser", "qwen3")
    assert both.reasoning_parser == "qwen3"
    assert set(REASONING_PARSERS) >= {"deepseek_r1", "qwen3"}


def test_a_hand_made_namespace_is_checked_too():
    ns = argparse.Namespace(
        structured_outputs_config={"disable_any_whitespace": True}, reasoning_parser="qwen3"
    )
    assert structured_outputs_config_from_args(ns) == StructuredOutputsConfig(
        disable_any_whitespace=True, reasoning_parser="qwen3"
    )
    with pytest.raises(ValueError, match="unknown field 'x'"):
        structured_outputs_config_from_args(argparse.Namespace(structured_outputs_config={"x": 1}))


def test_each_parse_gets_its_own_config_object():
    parser = parser_of(add_engine_args)
    ns = parser.parse_args(["--structured-outputs-config.disable_any_whitespace", "true"])
    first, second = engine_config_from_args(ns), engine_config_from_args(ns)
    first.structured_outputs_config.disable_any_whitespace = False
    assert second.structured_outputs_config.disable_any_whitespace is True


def test_a_config_file_sets_them(tmp_path):
    path = tmp_path / "router.yaml"
    path.write_text("structured-outputs-config:\n  disable_any_whitespace: true\nreasoning-parser: qwen3\n")
    config = router_config("--config", str(path))
    assert (config.disable_any_whitespace, config.reasoning_parser) == (True, "qwen3")


def test_every_flag_has_help():
    for add_args in (add_engine_args, add_router_args):
        actions = {a.option_strings[0]: a for a in parser_of(add_args)._actions if a.option_strings}
        for flag in ("--structured-outputs-config", "--reasoning-parser"):
            assert actions[flag].help and len(actions[flag].help) > 80, flag


def test_the_router_serves_with_the_config_it_was_given():
    config = StructuredOutputsConfig(disable_additional_properties=True, disable_any_whitespace=True)
    served = load_served_model(ModelSettings(structured_outputs=config))
    assert served.structured_outputs == config
    # the embedded SmolLM2 has no </think>: the router refuses a reasoning parser for it
    with pytest.raises(ValueError, match="--reasoning-parser qwen3 needs </think> as one token"):
        dataclasses.replace(served, structured_outputs=dataclasses.replace(config, reasoning_parser="qwen3"))


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = PdserveArgumentParser(prog="pdserve")
    serve.register(parser.add_subparsers(dest="subcommand"))
    return parser.parse_args(["serve", *argv])


def test_serve_hands_both_flags_to_the_router_and_every_worker():
    args = _serve_args(
        "--structured-outputs-config.disable_any_whitespace", "true",
        "--structured-outputs-config.backend", "guidance", "--reasoning-parser", "deepseek_r1",
    )  # fmt: skip
    expected = StructuredOutputsConfig(
        backend="guidance", disable_any_whitespace=True, reasoning_parser="deepseek_r1"
    )
    workers = parser_of(lambda p: add_worker_args(p, "decode")).parse_args(worker_argv(args))
    assert engine_config_from_args(workers).structured_outputs_config == expected
    router = parser_of(add_router_args).parse_args(router_argv(args, [], ["tcp://127.0.0.1:2"], 8000))
    assert config_from_args(router)[1].structured_outputs == expected


def test_serve_hands_on_nothing_when_they_are_not_given():
    args = _serve_args()
    for argv in (worker_argv(args), router_argv(args, [], ["tcp://127.0.0.1:2"], 8000)):
        assert "--structured-outputs-config" not in argv and "--reasoning-parser" not in argv
