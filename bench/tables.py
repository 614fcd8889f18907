"""The one table layout the benchmarks print: left-aligned columns under a header and a rule."""

from __future__ import annotations


def print_rows(rows: list[tuple[str, ...]], headers: tuple[str, ...] = ("measure", "result", "note")) -> None:
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]
    for line in (headers, tuple("-" * width for width in widths), *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
