"""The import rules of DESIGN.md ("Layout and who may import whom") as data, and a checker
that reads a module's source with `ast` and says where it breaks them. A module names a
package when it imports it (at the top or inside a function), passes it to
importlib.import_module / __import__ / importlib.util.find_spec as a literal, or writes it
in any string, docstrings included, as a dotted module path or a "module:function" target."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "kvtransfer", "prefill_worker", "decode_worker", "router", "pdserve")
GPU_LIBRARIES = ("torch", "triton")

# package -> the packages and libraries it must never name; pdserve (the command line and the
# benchmarks) may name them all, and nothing but pdserve may name pdserve.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "common": ("kvtransfer", "prefill_worker", "decode_worker", "router", "pdserve"),
    "kvtransfer": ("prefill_worker", "decode_worker", "router", "pdserve"),
    "prefill_worker": ("decode_worker", "router", "pdserve"),
    "decode_worker": ("prefill_worker", "router", "pdserve"),
    "router": ("kvtransfer", "prefill_worker", "decode_worker", "pdserve", *GPU_LIBRARIES),
    "pdserve": (),
}
_IMPORT_CALLS = {"import_module", "__import__", "find_spec"}
# "pkg.mod" or "pkg.mod:function" inside any text; a dotted name glued to a longer
# word ("pdserve_router.x", "x.router.y", "sub/router.py") is not a module path.
_MODULE_PATH = re.compile(r"(?<![\w./-])([a-z_][a-z0-9_]*)((?:\.[A-Za-z_]\w*)+)(:[A-Za-z_]\w*)?")


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    how: str  # "import", "importlib call" or "string"
    target: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.how} names {self.target}"


def _absolute(module: str | None, level: int, package: str) -> str:
    """The absolute name of `from <level dots><module> import ...` written in `package`."""
    if level == 0:
        return module or ""
    parts = package.split(".")
    base = parts[: len(parts) - level + 1]
    return ".".join([*base, module] if module else base)


def _names_in_text(text: str) -> list[str]:
    """Dotted module paths and module:function targets written in `text`."""
    return [m.group(1) + m.group(2) + (m.group(3) or "") for m in _MODULE_PATH.finditer(text)]


def _is_module_path(target: str) -> bool:
    """Any module:function target, or a dotted path whose first two parts are a module or
    package of this tree: a docstring's "router.url" or a logger's "pdserve.worker" is not."""
    module, colon, _ = target.partition(":")
    if colon:
        return True
    top, second = module.split(".")[:2]
    return (ROOT / top / second).is_dir() or (ROOT / top / f"{second}.py").is_file()


def references(source: str, package: str = "") -> list[tuple[int, str, str]]:
    """(line, how, dotted target) for every module this source names; `package` is the
    module's own package, for relative imports."""
    found: list[tuple[int, str, str]] = []
    call_arguments: set[int] = set()  # the literals already counted as importlib calls
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, "import", alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            found.append((node.lineno, "import", base))
            if not node.module:  # from . import x: x may be a module
                found += [(node.lineno, "import", f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0] if node.args else None
            if name in _IMPORT_CALLS and isinstance(first, ast.Constant) and isinstance(first.value, str):
                found.append((node.lineno, "importlib call", first.value))
                call_arguments.add(id(first))
        elif (
            isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in call_arguments
        ):
            for offset, text_line in enumerate(node.value.splitlines() or [""]):
                found += [(node.lineno + offset, "string", t) for t in _names_in_text(text_line)]
    return found


def check_source(forbidden: str, source: str, path: str = "<source>", package: str = "") -> list[Violation]:
    """Where a module (of `package`, for its relative imports) names `forbidden`, a package
    or a GPU library."""
    violations = []
    for line, how, target in references(source, package):
        top = re.split(r"[.:]", target, maxsplit=1)[0]
        if top != forbidden:
            continue
        if how == "string" and (forbidden in GPU_LIBRARIES or not _is_module_path(target)):
            continue  # prose may mention torch.cuda; the rule is about importing it
        violations.append(Violation(path, line, how, target))
    return violations


def check_package(package: str, forbidden: str) -> list[Violation]:
    violations = []
    for file in sorted((ROOT / package).rglob("*.py")):
        relative = file.relative_to(ROOT)
        module_package = ".".join(relative.parent.parts)
        violations += check_source(forbidden, file.read_text(), str(relative), module_package)
    return violations
