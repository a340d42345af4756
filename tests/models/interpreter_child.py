"""Runs a test file's kernel tests in a child pytest with Triton's interpreter on: for a CPU
run where triton was imported before tests/models/conftest.py could switch it on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_in_interpreter_child(test_file: str) -> None:
    """Run `test_file` in a child pytest (TRITON_INTERPRET=1) and fail with its output's tail."""
    path = Path(test_file).resolve()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(path)],
        cwd=path.parents[2],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
