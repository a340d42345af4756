"""`--structured-outputs-config` and `--reasoning-parser`: which grammar engine constrains
requests' outputs, the defaults of every request's JSON constraints, and the reasoning
parser. vLLM's StructuredOutputsConfig (its fields, defaults and flag names), checked when
the command line is parsed.

The router and the workers both take these flags (`pdserve serve` hands them to both):
the router applies disable_any_whitespace / disable_additional_properties to the requests
that do not set them, and refuses a request that asks for another backend; the workers
compile grammars with the backend. vLLM keeps --reasoning-parser here too; the flag wins
over the config's reasoning_parser.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from common.config.arg_parser import JsonObjectAction
from common.config.arg_types import choice
from common.config.field_checks import check_choice, check_known_fields, check_str
from common.config.shared_args import JSON_HELP
from common.structured_output.grammar_cache import BACKENDS, resolve_backend

# The reasoning parsers that --reasoning-parser accepts: the models whose thinking
# pdserve knows how to split from the answer (vLLM's names).
REASONING_PARSERS = ("deepseek_r1", "qwen3")
_FLAGS = (
    "disable_fallback",
    "disable_any_whitespace",
    "disable_additional_properties",
    "enable_in_reasoning",
)

# Help texts built once: the router's and the workers' parsers show the very same objects.
_CONFIG_HELP = (
    "Structured outputs configuration: backend (the grammar engine: "
    f"{' or '.join(BACKENDS)}, both llguidance; vLLM's xgrammar, outlines and "
    "lm-format-enforcer are not available), disable_fallback (no other backend is tried "
    "on error; with one backend there is none to fall back to), disable_any_whitespace "
    "(JSON without free whitespace between tokens), disable_additional_properties (JSON "
    "objects hold only the properties their schema declares, unless it says otherwise), "
    "reasoning_parser (as --reasoning-parser), enable_in_reasoning (constrain the reasoning "
    "too, not only the answer after it). A request's structured_outputs.disable_any_whitespace "
    "and disable_additional_properties win over these defaults. "
    + JSON_HELP.format(flag="structured-outputs-config")
    + ' (default: {"backend": "auto"}, every switch off)'
)
_REASONING_PARSER_HELP = (
    "Select the reasoning parser depending on the model that you're using. This is used to "
    "parse the reasoning content into OpenAI API format (reasoning_content apart from "
    "content), and structured outputs constrain only what follows the reasoning unless "
    "--structured-outputs-config.enable_in_reasoning is true. The same as "
    "--structured-outputs-config.reasoning_parser; this flag wins. (default: none)"
)


@dataclass
class StructuredOutputsConfig:
    backend: str = "auto"  # one of BACKENDS
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    reasoning_parser: str = ""  # "" or one of REASONING_PARSERS
    enable_in_reasoning: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StructuredOutputsConfig:
        """Check `data` (the JSON of --structured-outputs-config) and fill the defaults.

        Raises ValueError saying which field is wrong and what it may be.
        """
        check_known_fields(data, (f.name for f in fields(cls)))
        config = cls(**data)
        config.validate()
        return config

    def validate(self) -> None:
        check_str("backend", self.backend)
        resolve_backend(self.backend)  # its ValueError names the backends to use instead
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        check_str("reasoning_parser", self.reasoning_parser)
        if self.reasoning_parser:
            check_choice("reasoning_parser", self.reasoning_parser, REASONING_PARSERS)

    @property
    def engine(self) -> str:
        """The grammar engine the backend selects."""
        return resolve_backend(self.backend)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def add_structured_outputs_args(group: Any) -> None:
    """--structured-outputs-config and --reasoning-parser (router and workers)."""
    group.add_argument(
        "--structured-outputs-config",
        action=JsonObjectAction,
        from_dict=StructuredOutputsConfig.from_dict,
        default=None,
        help=_CONFIG_HELP,
    )
    group.add_argument(
        "--reasoning-parser",
        type=choice(REASONING_PARSERS),
        choices=REASONING_PARSERS,
        default=None,  # not "": argparse would check a string default against the choices
        help=_REASONING_PARSER_HELP,
    )


def structured_outputs_config_from_args(ns: argparse.Namespace) -> StructuredOutputsConfig:
    """The config of parsed flags: --structured-outputs-config (or its defaults) with
    --reasoning-parser, when given, as its reasoning_parser. A fresh object each call."""
    given = getattr(ns, "structured_outputs_config", None)
    if isinstance(given, dict):  # a namespace built by hand
        given = StructuredOutputsConfig.from_dict(given)
    config = replace(given) if given is not None else StructuredOutputsConfig()
    parser = getattr(ns, "reasoning_parser", None)
    if parser:
        config = replace(config, reasoning_parser=parser)
    return config
