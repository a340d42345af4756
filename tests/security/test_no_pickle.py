"""No pickle anywhere in pdserve's source: nothing imports pickle or its relatives, no
pyzmq *_pyobj call (pickle on the wire), no multiprocessing Connection (pickle over a
socket), no torch.load without weights_only=True, no numpy load with allow_pickle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIPPED_DIRS = {".venv", ".git", "build", "dist", "node_modules", "__pycache__"}
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"}
PICKLING_CALLS = {"send_pyobj", "recv_pyobj", "read_pickle", "to_pickle"}


def _sources() -> list[Path]:
    return [
        path for path in REPO.rglob("*.py") if not SKIPPED_DIRS.intersection(path.relative_to(REPO).parts)
    ]


def _keyword_true(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords
    )


def pickle_uses(source: str) -> list[str]:
    """What in `source` unpickles or pickles, one line each ("LINE: what")."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            modules = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            modules = []
        for module in modules:
            if module.split(".")[0] in PICKLING_MODULES or module.startswith("multiprocessing.connection"):
                found.append(f"{node.lineno}: imports {module}")
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute | ast.Name):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
        owner = node.func.value if isinstance(node.func, ast.Attribute) else None
        owner_name = owner.id if isinstance(owner, ast.Name) else ""
        if name in PICKLING_CALLS:
            found.append(f"{node.lineno}: calls {name}")
        elif name == "load" and owner_name == "torch" and not _keyword_true(node, "weights_only"):
            found.append(f"{node.lineno}: torch.load without weights_only=True")
        elif name == "load" and owner_name in ("np", "numpy") and _keyword_true(node, "allow_pickle"):
            found.append(f"{node.lineno}: numpy load with allow_pickle=True")
        elif name in ("Listener", "Client") and owner_name == "connection":
            found.append(f"{node.lineno}: multiprocessing connection {name}")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "from cloudpickle import dumps",
        "from multiprocessing.connection import Listener",
        "from multiprocessing import connection\nconnection.Client(('h', 1))",
        "sock.recv_pyobj()",
        "torch.load('w.pt')",
        "torch.load('w.pt', weights_only=False)",
        "np.load('a.npy', allow_pickle=True)",
    ],
)
def test_the_scan_finds_each_kind_of_pickle_use(snippet):
    assert pickle_uses(snippet)


def test_the_scan_lets_safe_loading_through():
    assert not pickle_uses("torch.load('w.pt', weights_only=True)\nnp.load('a.npy')\nmsgpack.unpackb(b'')")


def test_no_source_file_uses_pickle():
    sources = _sources()
    assert len(sources) > 50  # the scan sees the tree
    offenders = {
        str(path.relative_to(REPO)): uses
        for path in sources
        if (uses := pickle_uses(path.read_text(encoding="utf-8")))
    }
    assert not offenders, f"pickle on a path pdserve runs: {offenders}"
