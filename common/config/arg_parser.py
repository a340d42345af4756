"""The argument parser every pdserve command uses.

On top of argparse it gives what a vLLM operator expects from `vllm serve`:
- option names with `_` or `-` alike (`--max_model_len` = `--max-model-len`);
- JSON options set whole (`--kv-transfer-config '{"kv_role": "kv_both"}'`) or one key at a
  time (`--kv-transfer-config.kv_role kv_both`, nested `--x.a.b 1`), list items appended
  with `+` (`--x.key+ v1 --x.key+=v2,v3`); dotted values are JSON when they parse as
  JSON, else strings; dotted keys are merged over the whole object, wherever it came from;
- `--config FILE.yaml` whose keys are option names; options given on the command line win;
- errors as one line, "pdserve serve: error: argument --block-size: invalid choice: ...",
  exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from common.config.arg_types import json_object

_OPTION_NAME_RE = re.compile(r"--[^=.]+")
# Where a parse keeps the JSON objects given to JSON options, before from_dict made config
# objects of them: what the user wrote, for handing the option on (common/config/argv_of.py).
_JSON_GIVEN = "_json_given"


class JsonObjectAction(argparse.Action):
    """Stores a JSON object. `from_dict`, when given, checks the final object (after dotted
    keys are merged in) and turns it into a config object; a ValueError it raises becomes a
    one-line error naming the option."""

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        from_dict: Callable[[dict[str, Any]], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("type", json_object(option_strings[0]))
        kwargs.setdefault("metavar", "JSON")
        super().__init__(option_strings, dest, **kwargs)
        self.from_dict = from_dict

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        setattr(namespace, self.dest, values)


class ConfigFileAction(argparse.Action):
    """`--config FILE.yaml`: the parser reads the file before parsing; this only keeps the path."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("metavar", "FILE.yaml")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        setattr(namespace, self.dest, values)


class RefusedFlagAction(argparse.Action):
    """A boolean flag kept only to refuse its positive form with `refusal`; `--no-X` is accepted."""

    def __init__(self, option_strings: Sequence[str], dest: str, refusal: str, **kwargs: Any) -> None:
        positive = option_strings[0]
        kwargs.setdefault("default", False)
        super().__init__([positive, "--no-" + positive[2:]], dest, nargs=0, **kwargs)
        self.refusal = refusal

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[no-untyped-def]
        if option_string is None or not option_string.startswith("--no-"):
            parser.error(self.refusal)
        setattr(namespace, self.dest, False)


def add_config_file_arg(group: Any) -> None:
    """`--config FILE.yaml`, read by PdserveArgumentParser before the command line."""
    group.add_argument(
        "--config",
        action=ConfigFileAction,
        default=None,
        help="Read CLI options from a config file. Must be a YAML with the options of this command "
        "as keys (option names without the leading --, with - or _), e.g. 'max-model-len: 4096'. "
        "Options given on the command line win over the file.",
    )


def json_given(namespace: argparse.Namespace, dest: str) -> dict[str, Any] | None:
    """The JSON object given to the JSON option `dest` (whole, by dotted keys or in a --config
    file, merged), as written; None when it was not given."""
    return getattr(namespace, _JSON_GIVEN, {}).get(dest)


@dataclass
class _DottedKey:
    action: JsonObjectAction
    keys: list[str]
    value: Any
    append: bool


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after each option's help unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "(default" in help_text:
            return help_text
        return super()._get_help_string(action) or ""


class PdserveArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviations: `--max-model` must not silently mean `--max-model-len`.
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self._namespace_checks: list[Callable[[argparse.Namespace], None]] = []

    def add_namespace_check(self, check: Callable[[argparse.Namespace], None]) -> None:
        """Run `check` on the parsed options; a ValueError it raises becomes a one-line error,
        for rules that span several options."""
        self._namespace_checks.append(check)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.splitlines())}\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        args = list(sys.argv[1:] if args is None else args)
        args = self._config_file_tokens(args) + args
        args = _normalize_option_names(args)
        args, dotted = self._take_dotted_keys(args)
        namespace, extras = super().parse_known_args(args, namespace)
        self._finish_json_options(namespace, dotted)
        for check in self._namespace_checks:
            try:
                check(namespace)
            except ValueError as e:
                self.error(str(e))
        return namespace, extras

    # --- dotted JSON keys -------------------------------------------------------------

    def _json_option_names(self) -> str:
        names = [a.option_strings[0] for a in self._actions if isinstance(a, JsonObjectAction)]
        return ", ".join(names) or "none here"

    def _take_dotted_keys(self, args: list[str]) -> tuple[list[str], list[_DottedKey]]:
        kept: list[str] = []
        dotted: list[_DottedKey] = []
        i = 0
        while i < len(args):
            token = args[i]
            if token == "--":
                kept.extend(args[i:])
                break
            head, has_inline, inline = token.partition("=")
            if not (token.startswith("--") and "." in head):
                kept.append(token)
                i += 1
                continue
            name, _, path = head.partition(".")
            action = self._option_string_actions.get(name)
            if action is None:  # not one of ours: a subcommand's, or argparse reports it unknown
                kept.append(token)
                i += 1
                continue
            if not isinstance(action, JsonObjectAction):
                self.error(
                    f"argument {name}: takes no dotted keys ({head}); only JSON options do: "
                    f"{self._json_option_names()}"
                )
            if has_inline:
                raw, i = inline, i + 1
            elif i + 1 < len(args):
                raw, i = args[i + 1], i + 2
            else:
                self.error(f"argument {head}: expected one argument")
            append = path.endswith("+")
            keys = (path[:-1] if append else path).split(".")
            if "" in keys:
                self.error(f"argument {head}: empty key; write {name}.key.subkey VALUE")
            value: Any = [_json_or_text(item) for item in raw.split(",")] if append else _json_or_text(raw)
            dotted.append(_DottedKey(action, keys, value, append))
        return kept, dotted

    def _finish_json_options(self, namespace: argparse.Namespace, dotted: list[_DottedKey]) -> None:
        given = dict(getattr(namespace, _JSON_GIVEN, {}))
        for action in self._actions:
            if not isinstance(action, JsonObjectAction):
                continue
            value = getattr(namespace, action.dest, None)
            mine = [d for d in dotted if d.action is action]
            if mine:
                value = copy.deepcopy(value) if isinstance(value, dict) else {}
                for d in mine:
                    _set_path(value, d.keys, d.value, d.append)
            elif isinstance(value, dict):
                value = copy.deepcopy(value)  # never hand out the parser's default object
            if mine or (isinstance(value, dict) and value != action.default):
                given[action.dest] = copy.deepcopy(value)
            if isinstance(value, dict) and action.from_dict is not None:
                try:
                    value = action.from_dict(value)
                except ValueError as e:
                    self.error(f"argument {action.option_strings[0]}: {e}")
            setattr(namespace, action.dest, value)
        if given:
            setattr(namespace, _JSON_GIVEN, given)

    # --- --config FILE.yaml -----------------------------------------------------------

    def _config_file_tokens(self, args: list[str]) -> list[str]:
        """The file's settings as command-line tokens, to be placed before the real ones
        so that options given explicitly win (argparse keeps the last value)."""
        options = {s for a in self._actions if isinstance(a, ConfigFileAction) for s in a.option_strings}
        if not options:
            return []
        paths = []
        for i, token in enumerate(args):
            if token == "--":
                break
            if token in options and i + 1 < len(args):
                paths.append(args[i + 1])
            elif token.partition("=")[0] in options and "=" in token:
                paths.append(token.partition("=")[2])
        if len(paths) > 1:
            self.error(f"--config given {len(paths)} times ({', '.join(paths)}); give one file")
        return self._read_config_file(paths[0]) if paths else []

    def _read_config_file(self, path: str) -> list[str]:
        import yaml  # only when a config file is given

        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            self.error(f"--config {path}: cannot read the file ({e.strerror or e})")
        except UnicodeDecodeError:
            self.error(f"--config {path}: not a UTF-8 text file")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            self.error(f"--config {path}: not valid YAML ({_describe_yaml_error(e)})")
        if data is None:
            return []
        if not isinstance(data, dict):
            self.error(
                f"--config {path}: expected a mapping of option names to values "
                f"(like 'max-model-len: 4096'), got a YAML {type(data).__name__}"
            )
        tokens: list[str] = []
        for key, value in data.items():
            tokens.extend(self._config_entry_tokens(path, key, value))
        return tokens

    def _config_entry_tokens(self, path: str, key: Any, value: Any) -> list[str]:
        def fail(problem: str) -> NoReturn:
            self.error(f"--config {path}: {key}: {problem}")

        if not isinstance(key, str):
            self.error(f"--config {path}: option names must be strings, got {key!r}")
        name, has_dot, rest = key.partition(".")
        option = "--" + name.lstrip("-").replace("_", "-")
        action = self._option_string_actions.get(option)
        if action is None or isinstance(action, ConfigFileAction) or action.default == argparse.SUPPRESS:
            fail(
                "unknown option; keys are option names without the leading --, "
                "like max-model-len or max_model_len (see -h)"
            )
        if value is None:
            return []
        if has_dot:
            if not isinstance(action, JsonObjectAction):
                fail(f"only JSON options take dotted keys: {self._json_option_names()}")
            if rest.endswith("+"):
                fail("'+' is for the command line; write the list as a YAML list")
            return [f"{option}.{rest}", json.dumps(value)]
        if isinstance(action, RefusedFlagAction):
            if value is not False:
                fail(action.refusal)
            return []
        if action.nargs == 0:
            return self._config_flag_tokens(action, option, value, fail)
        if isinstance(action, JsonObjectAction):
            if not isinstance(value, dict | str):
                fail(f"expected a mapping (or a JSON string), got {value!r}")
            strings = [value if isinstance(value, str) else json.dumps(value)]
        elif action.nargs in ("+", "*"):
            items = value if isinstance(value, list) else [value]
            if not items and action.nargs == "+":
                fail("expected at least one value")
            strings = [_yaml_scalar_text(v, fail) for v in items]
        else:
            strings = [_yaml_scalar_text(value, fail)]
        for text in strings:
            try:
                converted = action.type(text) if callable(action.type) else text
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                fail(str(e))
            if action.choices is not None and converted not in action.choices:
                fail(f"invalid choice: {text!r} (choose from {', '.join(map(str, action.choices))})")
        return [option, *strings]

    @staticmethod
    def _config_flag_tokens(
        action: argparse.Action, option: str, value: Any, fail: Callable[[str], NoReturn]
    ) -> list[str]:
        if not isinstance(value, bool):
            fail(f"expected true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [option if value else "--no-" + option[2:]]
        if value == action.const:
            return [option]
        if value == action.default:
            return []
        fail(f"expected {str(action.const).lower()} or {str(action.default).lower()}, got {value!r}")


def _normalize_option_names(args: list[str]) -> list[str]:
    """`--max_model_len=1k` -> `--max-model-len=1k`; keys after a dot keep their underscores."""
    out: list[str] = []
    for i, token in enumerate(args):
        if token == "--":
            out.extend(args[i:])
            break
        match = _OPTION_NAME_RE.match(token) if "_" in token else None
        if match:
            token = match.group(0).replace("_", "-") + token[match.end() :]
        out.append(token)
    return out


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _set_path(target: dict[str, Any], keys: list[str], value: Any, append: bool) -> None:
    node = target
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    last = keys[-1]
    if append and isinstance(node.get(last), list):
        node[last] = node[last] + value
    else:
        node[last] = value


def _yaml_scalar_text(value: Any, fail: Callable[[str], NoReturn]) -> str:
    if isinstance(value, bool) or isinstance(value, dict | list):
        fail(f"expected a single value, got {value!r}")
    return str(value)


def _describe_yaml_error(error: Exception) -> str:
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem
