"""DESIGN.md's import rules, checked over every module of every package: common names none
of the others; kvtransfer only common; prefill_worker and decode_worker only common and
kvtransfer, never each other nor router; router only common, never torch or triton, and
importing it leaves them unloaded; nothing names pdserve. Tests may import anything.
The checker's own tests break each rule on purpose and see it caught."""

from __future__ import annotations

import pkgutil

import pytest

from tests.harness.torch_free import assert_imports_without_torch
from tests.repo.import_rules import FORBIDDEN, ROOT, check_package, check_source

RULES = [(package, forbidden) for package, names in FORBIDDEN.items() for forbidden in names]


@pytest.mark.parametrize(("package", "forbidden"), RULES, ids=[f"{p}-never-names-{f}" for p, f in RULES])
def test_a_package_never_names_what_it_may_not_import(package, forbidden):
    violations = check_package(package, forbidden)
    assert not violations, f"{package} names {forbidden}:\n" + "\n".join(map(str, violations))


def test_importing_every_router_module_leaves_torch_and_triton_unloaded():
    modules = ["router", *(m.name for m in pkgutil.walk_packages([str(ROOT / "router")], "router."))]
    assert "router.app" in modules
    assert_imports_without_torch(*modules)


# -- the checker catches a rule broken on purpose ----------------------------------------------


@pytest.mark.parametrize(
    ("package", "forbidden", "source", "line", "how", "target"),
    [
        ("common", "router", "import router\n", 1, "import", "router"),
        ("common", "router", "def f():\n    from router.app import build_app\n", 2, "import", "router.app"),
        ("common.engine", "kvtransfer", "from ...kvtransfer import factory\n", 1, "import", "kvtransfer"),
        ("common", "kvtransfer", '"""Made by kvtransfer.factory."""\n', 1, "string", "kvtransfer.factory"),
        ("common", "pdserve", 'TARGETS = {"x": "pdserve.bench.transfer:main"}\n', 1, "string", "pdserve.bench.transfer:main"),
        ("prefill_worker", "decode_worker", 'import importlib\nimportlib.import_module("decode_worker.role")\n', 2, "importlib call", "decode_worker.role"),
        ("decode_worker", "router", '__import__("router.cli")\n', 1, "importlib call", "router.cli"),
        ("kvtransfer", "prefill_worker", 'import importlib.util\nimportlib.util.find_spec("prefill_worker")\n', 2, "importlib call", "prefill_worker"),
        ("router", "torch", "def f():\n    import torch.cuda\n", 2, "import", "torch.cuda"),
        ("router", "triton", "from triton import language\n", 1, "import", "triton"),
        ("router", "pdserve", "from pdserve.bench import stats\n", 1, "import", "pdserve.bench"),
    ],
    ids=["import", "import-in-function", "relative-import", "docstring", "entry-point-string",
         "import-module", "dunder-import", "find-spec", "torch-in-function", "triton", "pdserve"],
)  # fmt: skip
def test_the_checker_flags_each_kind_of_reference(package, forbidden, source, line, how, target):
    [violation] = check_source(forbidden, source, "x.py", package)
    assert (violation.line, violation.how, violation.target) == (line, how, target)
    assert str(violation) == f"x.py:{line}: {how} names {target}"


def test_the_checker_leaves_prose_and_allowed_imports_alone():
    source = '''"""The router.url of a worker; pdserve_router_requests_total; see torch.cuda docs."""
import common.protocol
from kvtransfer import factory
LOG = "pdserve.worker"
'''
    assert check_source("router", source, package="decode_worker") == []
    assert check_source("torch", source, package="router") == []
    assert check_source("pdserve", source, package="common") == []


def test_a_broken_rule_fails_the_package_test(tmp_path, monkeypatch):
    """The real-tree test on a copy of common/ with one bad line: it fails, naming file:line."""
    import tests.repo.import_rules as rules

    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "bad.py").write_text(
        '"""Docs."""\nimport importlib\nimportlib.import_module("router.cli")\n'
    )
    (tmp_path / "router").mkdir()
    (tmp_path / "router" / "cli.py").write_text("")
    monkeypatch.setattr(rules, "ROOT", tmp_path)
    with pytest.raises(AssertionError, match=r"common/bad.py:3: importlib call names router.cli"):
        test_a_package_never_names_what_it_may_not_import("common", "router")
