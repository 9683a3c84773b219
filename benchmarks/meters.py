"""CPU and memory of the processes taking part in a measurement."""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Any

import psutil


class CpuMeter:
    """CPU time of named processes over an interval, as % of one core.

    A name ending in ``*`` counts the process tree: live descendants plus the children it has
    reaped (PostgreSQL's backends come and go with connections). Other names count the process
    alone (the benchmark process is the parent of the broker, the database and the API).
    """

    def __init__(self, processes: dict[str, int | None]) -> None:
        self._processes = {
            name: psutil.Process(pid) for name, pid in processes.items() if pid is not None
        }
        self._start: dict[str, float] = {}
        self._started = 0.0

    @staticmethod
    def _cpu(process: psutil.Process, tree: bool) -> float:
        try:
            times = process.cpu_times()
            total: float = times.user + times.system
            if tree:
                total += times.children_user + times.children_system
                for child in process.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        child_times = child.cpu_times()
                        total += child_times.user + child_times.system
        except psutil.Error:
            return 0.0
        return total

    def start(self) -> None:
        psutil.cpu_percent()  # resets the machine-wide counter
        self._started = time.perf_counter()
        self._start = {
            name: self._cpu(p, name.endswith("*")) for name, p in self._processes.items()
        }

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._started
        used = {
            name.rstrip("*"): round(
                100 * (self._cpu(p, name.endswith("*")) - self._start[name]) / wall, 1
            )
            for name, p in self._processes.items()
        }
        machine = psutil.cpu_percent() * (psutil.cpu_count() or 1)
        return used | {f"all {psutil.cpu_count()} cores": round(machine, 1)}


class GcPauses:
    """This process's garbage-collection pauses over an interval. The load generator is this
    process: while it collects, answers wait unread and requests go out late, which would count
    as the service's latency. ``benchmarks.run`` tunes its collector as the service does; this
    shows what pauses remain."""

    def __init__(self) -> None:
        self.longest_s = 0.0
        self._began = 0.0

    def _callback(self, phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.longest_s = max(self.longest_s, time.perf_counter() - self._began)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *_: object) -> None:
        gc.callbacks.remove(self._callback)


def cpu_details(cpu: dict[str, float]) -> str:
    """CPU used, in % of one core."""
    return "CPU " + ", ".join(f"{name} {value:.0f}%" for name, value in cpu.items())


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes (0 if it is gone)."""
    try:
        value: int = psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0
    return value
