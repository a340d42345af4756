"""The tables benchmarks print: Markdown tables (pasted as they are into docs/benchmarks.md)
and plain aligned columns for a terminal."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_row(cells: Sequence[str]) -> str:
    """`| a | b |`: cells that carry their own padding keep it, so fixed-width rows line up."""
    return "| " + " | ".join(cells) + " |"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str) -> str:
    """A Markdown table; `align` has one letter a column, l (left) or r (right)."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return "\n".join([markdown_row(header), rule, *(markdown_row(row) for row in rows)])


def aligned_columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as columns two spaces apart: the first left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )
