"""Parsed values back into a command line: how a launcher hands the options it parsed on
to the processes it starts, from the same declarations they parse, with no list of flags
kept beside them.

    argv_of(namespace, actions)  # ["--max-model-len", "2000", "--served-model-name", "a", "b"]

Only values that differ from the option's default are written (the child would assume
the default anyway); JSON options are written as the object that was given, before it
became a config object, so fields the child fills itself (a random engine_id) stay its
own. --config is never written: its file's values are in the namespace already.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from typing import Any

from common.config.arg_parser import ConfigFileAction, JsonObjectAction, json_given


def argv_of(namespace: argparse.Namespace, actions: Iterable[argparse.Action]) -> list[str]:
    """The command-line words that give a parser declaring `actions` the values in `namespace`."""
    argv: list[str] = []
    for action in actions:
        argv += _option_words(namespace, action)
    return argv


def _option_words(namespace: argparse.Namespace, action: argparse.Action) -> list[str]:
    if (
        not action.option_strings
        or isinstance(action, ConfigFileAction)
        or action.default == argparse.SUPPRESS
    ):
        return []  # positionals, -h, --version, --config
    flag = next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])
    if isinstance(action, JsonObjectAction):
        given = json_given(namespace, action.dest)
        return [] if given is None else [flag, json.dumps(given)]
    value = getattr(namespace, action.dest, action.default)
    if value == _default(action):
        return []
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag if value else "--no-" + flag[2:]]
    if action.nargs == 0:  # store_true, store_false, store_const
        if value != action.const:
            raise ValueError(f"{flag}: {value!r} cannot be written on a command line")
        return [flag]
    if isinstance(value, list | tuple):
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            return [flag, *map(str, value)]
        return [word for item in value for word in (flag, str(item))]  # append, extend
    return [flag, str(value)]


def _default(action: argparse.Action) -> Any:
    """The default as parsed: argparse runs a string default through the option's type."""
    default = action.default
    if isinstance(default, str) and callable(action.type):
        try:
            return action.type(default)
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            return default
    return default
