"""What the benchmark measures of a consumer process, and of the machine it ran on."""

from __future__ import annotations

import contextlib
import os
import platform
import threading
import time
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import psutil

MIB = 1024 * 1024
LIBRARIES = ("google-cloud-pubsub", "google-auth", "google-cloud-run", "aiohttp", "grpcio", "requests")


class ProcessMonitor:
    """CPU seconds (process and children, live or exited) between start and stop; peak RSS
    (process and live children) sampled every 100 ms.

    `machine_busy_pct` is the whole machine's CPU use meanwhile: on a small shared
    machine the emulator, the local cloud and the consumer compete for the same cores,
    and near 100 % the figures measure the machine rather than the consumer."""

    def __init__(self, pid: int, every_s: float = 0.1) -> None:
        self._process = psutil.Process(pid)
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._cpu_start = 0.0
        self.cpu_s = 0.0
        self.peak_rss = 0
        self.machine_busy_pct = 0.0

    def _cpu(self) -> float:
        t = self._process.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system  # children_*: exited ones
        for child in self._live_children():  # e.g. `worker run`'s span relay
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
        return total

    def _live_children(self) -> list[psutil.Process]:
        try:
            return list(self._process.children(recursive=True))
        except psutil.Error:
            return []

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self._process.memory_info().rss
            except psutil.NoSuchProcess:
                return
            for child in self._live_children():
                with contextlib.suppress(psutil.Error):
                    rss += child.memory_info().rss
            self.peak_rss = max(self.peak_rss, rss)
            time.sleep(self._every_s)

    def __enter__(self) -> ProcessMonitor:
        self._cpu_start = self._cpu()
        psutil.cpu_percent(interval=None)  # starts the machine-wide interval
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # Read before the driver stops the process: a dead process has no CPU times.
        self.cpu_s = self._cpu() - self._cpu_start
        self.machine_busy_pct = psutil.cpu_percent(interval=None)
        self._stop.set()
        self._thread.join()


class GroupMonitor:
    """CPU seconds of named groups of processes between start and stop (for each group,
    its processes and their children): who else used the cores meanwhile."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self._groups = {name: [psutil.Process(pid) for pid in pids] for name, pids in groups.items()}
        self._start: dict[str, float] = {}
        self.cpu_s: dict[str, float] = {}

    def _cpu(self) -> dict[str, float]:
        found = {}
        for name, processes in self._groups.items():
            total = 0.0
            for process in processes:
                try:
                    t = process.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                total += t.user + t.system + t.children_user + t.children_system
            found[name] = total
        return found

    def __enter__(self) -> GroupMonitor:
        self._start = self._cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._cpu()
        self.cpu_s = {name: end[name] - self._start[name] for name in end}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "libraries": versions,
        "load_average_at_start": os.getloadavg(),
    }
