"""What a run writes besides its table: the plots, and the environment it ran in."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from typing import Any

import psutil

from benchmarks import plots, projector
from benchmarks.context import RESULTS, ROOT, Context


def write_plots(ctx: Context) -> list[str]:
    """``throughput.png`` and ``latency.png`` of what the run measured; the paths written."""
    written = []
    lines = []
    if ctx.projector_run is not None:
        lines.append(
            plots.Series("ours: exactly-once, mean of the projections", ctx.projector_run.rates())
        )
    if ctx.naive_run is not None:
        lines.append(
            plots.Series(
                "peer: naive projector (orders only)", projector.rates(ctx.naive_run.samples, 2.0)
            )
        )
    if lines:
        path = RESULTS / "throughput.png"
        plots.throughput(
            path,
            lines,
            {"raw consume": ctx.limit("raw_consume")},
            title="Projector throughput over time",
        )
        written.append(str(path))
    curves = {
        "command API": [
            (rate, load.percentile(0.5) * 1000, load.percentile(0.99) * 1000)
            for rate, load in ctx.api_open.items()
        ],
        "HTTP ceiling (bare Litestar)": [
            (rate, load.percentile(0.5) * 1000, load.percentile(0.99) * 1000)
            for rate, load in ctx.ceiling.items()
        ],
    }
    points = {}
    if ctx.visible is not None and ctx.visible.visible:
        points["command-to-queryable"] = (
            float(ctx.plan.queryable_rate),
            ctx.visible.percentile(0.5) * 1000,
            ctx.visible.percentile(0.99) * 1000,
        )
    if any(curves.values()) or points:
        path = RESULTS / "latency.png"
        plots.latency(path, curves, points, title="Latency against offered load (open loop)")
        written.append(str(path))
    return written


def environment(quick: bool) -> dict[str, Any]:
    """Where and when the run ran: commit, Python, CPUs, memory, load average at the start."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=10,
    ).stdout.strip()
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "git_commit": commit,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "memory_bytes": psutil.virtual_memory().total,
    }
