"""Engine flags parsed as `pdserve serve` parses them, for the tests of option spellings
(config files, JSON options): the namespace, or the one-line error and exit status 2."""

from __future__ import annotations

import pytest

from common.config.arg_parser import PdserveArgumentParser
from common.config.engine_args import add_engine_args


def parse(*argv: str):
    parser = PdserveArgumentParser(prog="pdserve serve")
    add_engine_args(parser)
    return parser.parse_args(list(argv))


def parse_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()
