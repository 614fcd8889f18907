"""The one table layout the benchmarks print: left-aligned columns under a header and a rule."""

from __future__ import annotations


def print_rows(rows: list[tuple[str, ...]], headers: tuple[str, ...] = ("measure", "result", "note")) -> None:
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]
    for line in (headers, tuple("-" * width for width in widths), *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank: a sample that was really measured."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def p50(samples: list[float]) -> float:
    return percentile(samples, 50)


def ms(seconds: float) -> str:
    """A duration as people read it: 2.31 ms, 845 ms, 12.4 s."""
    if seconds < 0.01:
        return f"{seconds * 1000:.2f} ms"
    if seconds < 10:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s"
