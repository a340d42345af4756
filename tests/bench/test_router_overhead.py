"""`pdserve bench router-overhead` runs end to end at a small size: a real `pdserve router`
in front of its stand-in workers, every request answered through HTTP, and a report with
each measurement (figures are the benchmark's job, not this test's)."""

from __future__ import annotations

import json

from pdserve.cli.main import main

ROWS = [
    "block hashes",
    "RoutingPolicy.choose",
    "decision (hashes + choose)",
    "router, prompt as text",
    "router, prompt as token ids",
    "straight to the worker (ZMQ)",
    "added by the router, text",
    "added by the router, token ids",
]


def test_the_command_measures_every_row_through_a_real_router(tmp_path, capsys):
    out = tmp_path / "overhead.json"
    argv = ["bench", "router-overhead", "--num-requests", "4", "--prompt-tokens", "256", "--num-workers", "2",
            "--concurrency", "2", "--output-json", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert list(result["rows_ms"]) == ROWS
    assert result["prompt_tokens_mean"] == 256  # the router counted the prompts as sent
    for name in ROWS[:6]:
        assert result["rows_ms"][name]["p50"] > 0, name
    assert result["decisions_per_s"] > 0 and result["requests_per_s"] > 0
    report = capsys.readouterr().out
    assert all(f"| {name} |" in report for name in ROWS)
    assert "decisions per second" in report and "load average" in report
