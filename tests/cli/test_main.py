"""`pdserve`: lazy subcommands, help, version, exit statuses and one-line errors."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pdserve.cli import main as cli
from tests.harness.torch_free import assert_imports_without_torch

REPO = Path(__file__).resolve().parents[2]
ALL_SUBCOMMANDS = [
    "serve",
    "router",
    "prefill",
    "decode",
    "chat",
    "complete",
    "bench",
    "collect-env",
    "run-batch",
]

FAKE_SUBCOMMAND = '''
"""A subcommand with the engine flags, for tests; it records the EngineConfig it got."""
from common.config.engine_args import add_engine_args, engine_config_from_args

received = []


def register(subparsers):
    parser = subparsers.add_parser("fake", help="a fake subcommand")
    add_engine_args(parser)
    parser.set_defaults(func=run)


def run(args):
    received.append(engine_config_from_args(args))
    return 3 if args.max_model_len == 3 else None
'''


def loader(module: str):
    """A Subcommand's load for a test module (the real table imports with plain statements)."""
    return lambda: importlib.import_module(module).register


@pytest.fixture
def fake_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`fake` (a working subcommand), `boom` (fails on import) and `needy` (needs a missing package)."""
    (tmp_path / "pdserve_fake_cmd.py").write_text(FAKE_SUBCOMMAND)
    (tmp_path / "pdserve_boom_cmd.py").write_text("raise RuntimeError('imported although not invoked')\n")
    (tmp_path / "pdserve_needy_cmd.py").write_text("import pdserve_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(
        cli,
        "SUBCOMMANDS",
        {
            "fake": cli.Subcommand("A fake subcommand.", loader("pdserve_fake_cmd")),
            "boom": cli.Subcommand("Explodes when imported.", loader("pdserve_boom_cmd")),
            "needy": cli.Subcommand("Needs a missing package.", loader("pdserve_needy_cmd")),
            "later": cli.Subcommand("Comes in a later build.", loader("pdserve.cli.pdserve_not_written_yet")),
        },
    )
    for name in ("pdserve_fake_cmd", "pdserve_boom_cmd", "pdserve_needy_cmd"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return tmp_path


def one_line(text: str) -> str:
    assert text.count("\n") == 1 and text.endswith("\n"), f"expected one line, got {text!r}"
    return text.strip()


def test_subcommand_runs_with_its_engine_flags_and_imports_only_itself(
    fake_modules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["fake", "--max-model-len", "1k", "--block-size", "32"]) == 0
    received = sys.modules["pdserve_fake_cmd"].received
    assert [(c.max_model_len, c.block_size) for c in received] == [(1000, 32)]
    assert "pdserve_boom_cmd" not in sys.modules


def test_subcommand_exit_status_is_returned(fake_modules: Path) -> None:
    assert cli.main(["fake", "--max-model-len", "3"]) == 3


def test_help_lists_every_subcommand_without_importing_any(
    fake_modules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["-h"]) == 0
    out = capsys.readouterr().out
    for name, sub in cli.SUBCOMMANDS.items():
        assert name in out and sub.help in out
    assert "pdserve_boom_cmd" not in sys.modules and "pdserve_fake_cmd" not in sys.modules


def test_bad_value_is_one_line_naming_the_subcommand_and_flag(
    fake_modules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["fake", "--block-size", "7"]) == 2
    assert one_line(capsys.readouterr().err) == (
        "pdserve fake: error: argument --block-size: invalid choice: '7' (choose from 1, 8, 16, 32, 64, 128)"
    )
    assert cli.main(["fake", "--max-model-len", "abc"]) == 2
    assert "pdserve fake: error: argument --max-model-len: invalid value 'abc'" in one_line(
        capsys.readouterr().err
    )


def test_trust_remote_code_is_refused_through_main(
    fake_modules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["fake", "--trust-remote-code"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(
        "pdserve fake: error: --trust-remote-code is not supported: pdserve never runs code"
    )


def test_subcommand_not_written_yet_says_so_in_one_line(
    fake_modules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["later", "--anything"]) == 2
    assert one_line(capsys.readouterr().err) == "pdserve later: not available in this build yet"


def test_subcommand_missing_a_package_says_which_in_one_line(
    fake_modules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["needy"]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("pdserve needy: needs the Python package 'pdserve_no_such_dependency'")


def test_no_subcommand_and_unknown_subcommand_exit_2_in_one_line(
    fake_modules: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([]) == 2
    assert one_line(capsys.readouterr().err).startswith("pdserve: error: give a subcommand: fake, boom")
    assert cli.main(["nope"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("pdserve: error: argument subcommand: invalid choice: 'nope'") and "'fake'" in line


def test_each_entry_imports_the_module_it_launches() -> None:
    expected = {"router": "router.cli", "serve": "pdserve.cli.serve", "run-batch": "pdserve.cli.run_batch"}
    for name, module in expected.items():
        register = cli.SUBCOMMANDS[name].load()
        assert register is sys.modules[module].register


def test_table_holds_the_designed_subcommands() -> None:
    assert list(cli.SUBCOMMANDS) == ALL_SUBCOMMANDS
    assert cli.SUBCOMMANDS["run-batch"].load().__module__ == "pdserve.cli.run_batch"
    assert all(sub.help for sub in cli.SUBCOMMANDS.values())


# --- real processes ----------------------------------------------------------------------


def run(*command: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), capture_output=True, text=True, cwd=REPO, timeout=120, **kwargs)


def test_python_m_help_lists_all_subcommands() -> None:
    proc = run(sys.executable, "-m", "pdserve.cli.main", "-h")
    assert proc.returncode == 0, proc.stderr
    for name in ALL_SUBCOMMANDS:
        assert f"    {name} " in proc.stdout


def test_console_script_help_and_version() -> None:
    assert shutil.which("pdserve"), "the pdserve console script is not installed: pip install -e ."
    proc = run("pdserve", "-h")
    assert proc.returncode == 0 and "collect-env" in proc.stdout
    proc = run("pdserve", "--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"pdserve {importlib.metadata.version('pdserve')}"


def test_bad_value_in_a_real_process_is_one_line_on_stderr(tmp_path: Path) -> None:
    (tmp_path / "pdserve_fake_cmd.py").write_text(FAKE_SUBCOMMAND)
    script = textwrap.dedent(
        """
        import sys
        from pdserve.cli import main as cli
        import importlib
        cli.SUBCOMMANDS["fake"] = cli.Subcommand("fake", lambda: importlib.import_module("pdserve_fake_cmd").register)
        sys.exit(cli.main(sys.argv[1:]))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = run(sys.executable, "-c", script, "fake", "--dtype", "fp64", env=env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert one_line(proc.stderr) == (
        "pdserve fake: error: argument --dtype: invalid choice: 'fp64' "
        "(choose from auto, half, float16, bfloat16, float, float32)"
    )


def test_config_and_cli_stay_torch_free() -> None:
    assert_imports_without_torch(
        "common.config.engine_args",
        then="""
            import contextlib, importlib, io
            from pdserve.cli import main as cli
            cli.SUBCOMMANDS["later"] = cli.Subcommand(
                "later", lambda: importlib.import_module("pdserve.cli.pdserve_not_written_yet").register
            )
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                statuses = [cli.main(["-h"]), cli.main(["later"]), cli.main(["--version"])]
            assert statuses == [0, 2, 0], statuses
            from common.config.arg_parser import PdserveArgumentParser
            parser = PdserveArgumentParser(prog="x")
            common.config.engine_args.add_engine_args(parser)
            args = parser.parse_args(["--kv-transfer-config.kv_role", "kv_both"])
            common.config.engine_args.engine_config_from_args(args)
        """,
    )


def test_every_flag_of_every_subcommand_has_help_text():
    import argparse

    from common.config.arg_parser import PdserveArgumentParser
    from pdserve.cli.main import SUBCOMMANDS

    parser = PdserveArgumentParser(prog="pdserve")
    subparsers = parser.add_subparsers(dest="subcommand")
    for sub in SUBCOMMANDS.values():
        sub.load()(subparsers)
    missing = []

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")
            elif action.option_strings and not action.help:
                missing.append(f"{path} {action.option_strings[-1]}")

    walk(parser, "pdserve")
    assert not missing, f"flags without help text: {missing}"
