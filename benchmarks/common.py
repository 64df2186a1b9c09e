"""Shared helpers for benchmark scripts: machine description, results JSON and RESULTS.md."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem_gb:.0f} GiB, Python {platform.python_version()}"


def command() -> str:
    return (
        "python -m benchmarks." + Path(sys.argv[0]).stem + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    )


def write_json(name: str, figures: dict) -> Path:
    path = HERE / "results" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    return path


def append_results(title: str, table: str, notes: str = "") -> None:
    """Append a dated section to RESULTS.md (newest last; older runs stay for comparison)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    ).stdout.strip()
    section = (
        f"\n## {title}\n\n"
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit or '?'}\n"
        f"- machine: {machine()}\n"
        f"- command: `{command()}`\n\n{table}\n" + (f"\n{notes}\n" if notes else "")
    )
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nEach section: what was measured, where, and the command "
            "that reproduces it. Key figures are also in `benchmarks/results/*.json`.\n"
        )
    with open(RESULTS, "a") as fh:
        fh.write(section)


def markdown_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        out.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(out)
