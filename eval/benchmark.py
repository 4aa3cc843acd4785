"""What the benchmark scripts (bench_lif, bench_attention, bench_model) share: the timer, where a report says it
ran, its JSON file and its table."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils.benchmark

REPO = Path(__file__).resolve().parents[1]

# A table column: header, width, the row's key (or a function of the row) and a format spec; "" formats
# the value as left-aligned text, anything else as a right-aligned number.
Column = tuple[str, int, "str | Callable[[dict], object]", str]


def choices(parser: argparse.ArgumentParser, option: str, text: str, allowed) -> list[str]:
    """The comma-separated names of ``option``; an unknown one ends the script through ``parser.error``."""
    names = text.split(",")
    if unknown := [n for n in names if n not in allowed]:
        parser.error(f"{option}: unknown {unknown}; choose from {tuple(allowed)}")
    return names


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def time_ms(fn: Callable[[], object], budget_ms: float, device: str) -> float:
    """Median time of ``fn`` in ms, measured for about ``budget_ms`` after two untimed calls (compilation,
    autotuning, allocator): ``triton.testing.do_bench`` on CUDA (CUDA events, L2 flushed between calls),
    ``torch.utils.benchmark.Timer`` on the CPU."""
    fn(), fn()
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, rep=budget_ms, return_mode="median")
    timer = torch.utils.benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=budget_ms / 1e3).median * 1e3


def git_commit() -> str | None:
    """The checked-out commit (``git rev-parse HEAD``), or None outside a git checkout or without git."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())


def write_report(report: dict, kind: str, out: Path | None) -> Path:
    """Write the report as JSON to ``out``, by default eval/results/<kind>_<device>_<date>.json."""
    slug = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-")
    out = out or REPO / "eval" / "results" / f"{kind}_{slug}_{report['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return out


def peak_mib(row: dict) -> float | None:
    return None if row.get("peak_mem_bytes") is None else row["peak_mem_bytes"] / 2**20


def _cells(row: dict, columns: list[Column]) -> list[str]:
    """A row's values as the columns format them, "-" where missing (not yet padded)."""
    cells = []
    for _, _, key, spec in columns:
        value = key(row) if callable(key) else row.get(key)
        cells.append("-" if value is None else f"{value:{spec}}" if spec else str(value))
    return cells


def print_table(rows: list[dict], columns: list[Column]) -> None:
    """One line per row; a missing value prints as "-", and a row's ``error`` or ``skipped`` reason as its note."""
    header = " ".join(f"{title:>{width}}" if spec else f"{title:<{width}}" for title, width, _, spec in columns)
    print(header + "  note")
    print("-" * (len(header) + 6))
    for row in rows:
        cells = [
            f"{cell:>{width}}" if spec else f"{cell:<{width}}"
            for cell, (_, width, _, spec) in zip(_cells(row, columns), columns, strict=True)
        ]
        note = row.get("error") or row.get("skipped")
        print(" ".join(cells) + (f"  {note}" if note else ""))


def markdown_table(rows: list[dict], columns: list[Column]) -> str:
    """The table of ``print_table`` in Markdown, numbers right-aligned."""
    lines = [
        "| " + " | ".join(title for title, _, _, _ in columns) + " |",
        "|" + "|".join("---:" if spec else "---" for _, _, _, spec in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cells(row, columns)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def publish(kind: str, device: str, rows: list[dict], columns: list[Column], out: Path | None, **fields) -> dict:
    """A benchmark run's report: where and when it ran, ``fields`` and the rows; written as JSON (see
    ``write_report``) and printed as a table."""
    report = {
        "device": device_name(device),
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": version("triton"),
        **fields,
        "rows": rows,
    }
    path = write_report(report, kind, out)
    print_table(rows, columns)
    print(f"wrote {path}")
    return report
