"""docs/architecture.md walks one request through the code file by file: every path it
names must exist, so the page cannot drift from the tree unnoticed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
# a path in backquotes: at least one folder, ending in a file name or a slash
PATH = re.compile(r"`((?:[A-Za-z0-9_.-]+/)+(?:[A-Za-z0-9_.-]+\.(?:py|md|sh|yaml|json))?)`")


def named_paths(text: str) -> list[str]:
    return sorted(set(PATH.findall(text)))


def test_the_architecture_page_names_paths():
    paths = named_paths(DOC.read_text())
    # the walk names the role packages, the engine, the connectors and the router
    for must in ("prefill_worker/producer.py", "decode_worker/consumer.py", "common/engine/scheduler.py",
                 "kvtransfer/factory.py", "router/orchestrator.py", "pdserve/cli/main.py"):
        assert must in paths


def test_every_path_the_architecture_page_names_exists():
    missing = [p for p in named_paths(DOC.read_text()) if not (ROOT / p).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_a_missing_path_is_caught():
    assert named_paths("see `common/no_such_module.py` and `router/`") == ["common/no_such_module.py", "router/"]
