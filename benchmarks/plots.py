"""PNG plots of a run: throughput over time, latency percentiles against offered load."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Series:
    label: str
    points: Sequence[tuple[float, float]]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def throughput(
    path: Path, series: Sequence[Series], limits: dict[str, float], *, title: str
) -> None:
    """Events/s over time (one line per series), limits as horizontal dashed lines."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(9, 5))
    for line in series:
        if line.points:
            xs, ys = zip(*line.points, strict=True)
            axes.plot(xs, ys, label=line.label)
    for label, value in limits.items():
        if value > 0:
            axes.axhline(value, linestyle="--", linewidth=1, color="grey")
            axes.annotate(label, (0, value), textcoords="offset points", xytext=(4, 3), fontsize=8)
    axes.set_xlabel("seconds (ours: since its process started; peer: since its first event)")
    axes.set_ylabel("events/s (2 s window)")
    axes.set_title(title)
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def latency(
    path: Path,
    curves: Mapping[str, Sequence[tuple[float, float, float]]],
    points: Mapping[str, tuple[float, float, float]],
    *,
    title: str,
) -> None:
    """p50 and p99 (ms, log scale) against offered load, per curve; single points marked."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(9, 5))
    for label, rows in curves.items():
        if not rows:
            continue
        rates, p50s, p99s = zip(*sorted(rows), strict=True)
        (line,) = axes.plot(rates, p99s, marker="o", label=f"{label} p99")
        axes.plot(
            rates, p50s, marker=".", linestyle=":", color=line.get_color(), label=f"{label} p50"
        )
    for label, (offered, p50, p99) in points.items():
        axes.scatter(
            [offered, offered], [p50, p99], marker="x", s=60, color="red", label=f"{label} p50/p99"
        )
    axes.set_xlabel("offered load (commands/s, open loop)")
    axes.set_ylabel("latency (ms)")
    axes.set_yscale("log")
    axes.set_title(title)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
