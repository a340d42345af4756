"""The one check that a module stays torch-free: the router and the command line must start
fast on a machine with no GPU libraries, so what they import must not pull in torch or
triton. Run in a fresh interpreter, since the test process itself has torch loaded."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.harness.stack import REPO

GPU_LIBRARIES = ("torch", "triton")


def assert_imports_without_torch(*modules: str, then: str = "", timeout_s: float = 120.0) -> None:
    """Import `modules`, run the statements `then` (they may assert), and fail, naming what
    was loaded, if torch or triton is in sys.modules afterwards."""
    code = "\n".join(
        [
            *(f"import {module}" for module in modules),
            textwrap.dedent(then),
            "import json, sys",
            f"print(json.dumps([m for m in {GPU_LIBRARIES!r} if m in sys.modules]))",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout_s
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert not loaded, f"importing {', '.join(modules)} loaded {', '.join(loaded)}"
