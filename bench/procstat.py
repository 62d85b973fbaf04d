"""CPU time and memory of processes, read from /proc (Linux only; no psutil needed).

``cpu_seconds(pid)`` is utime + stime of one process (its own threads included, children
excluded); ``tree_cpu_seconds(pid)`` adds its live children (PostgreSQL forks one backend per
connection). Clock ticks are 1/100 s here, so runs of a few seconds are plenty.
"""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of ``pid`` (0.0 if it is gone or None)."""
    if pid is None:
        return 0.0
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # After the name: state(0) ppid(1) … utime(11) stime(12) cutime(13) cstime(14).
    return (int(fields[11]) + int(fields[12])) / _TICK


def cpu_split_seconds(pid: int | None) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid``."""
    fields = _stat_fields(pid) if pid is not None else None
    if fields is None:
        return 0.0, 0.0
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def children(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def tree_cpu_seconds(pid: int | None) -> float:
    """CPU seconds of ``pid`` and its live direct children, plus children it already reaped."""
    if pid is None:
        return 0.0
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    total = (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / _TICK
    return total + sum(cpu_seconds(child) for child in children(pid))


def all_processes() -> dict[int, tuple[int, float]]:
    """Every process now: pid → (parent pid, user + system CPU seconds)."""
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                found[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
    return found


def foreign_cpu_seconds(
    before: dict[int, tuple[int, float]], after: dict[int, tuple[int, float]], ours: set[int]
) -> float:
    """CPU used between two ``all_processes()`` snapshots by processes that are not ``ours`` (nor
    children of ours). Processes that started and ended in between are missed."""

    def mine(pid: int, table: dict[int, tuple[int, float]]) -> bool:
        return pid in ours or table.get(pid, (0, 0.0))[0] in ours

    total = 0.0
    for pid, (_, cpu) in after.items():
        if mine(pid, after):
            continue
        total += cpu - before[pid][1] if pid in before else cpu
    return max(total, 0.0)


def memory_kib(pid: int | None, field: str) -> int | None:
    """A ``/proc/<pid>/status`` memory line in KiB (``VmHWM`` = peak resident, ``VmRSS`` = now)."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except FileNotFoundError:
        return None
    return None


_MACHINE_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_seconds() -> dict[str, float]:
    """CPU seconds of the whole machine since boot, over all cores, by kind (/proc/stat);
    ``busy`` is everything but idle and iowait (steal included: those cycles were not ours)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    seconds = {name: value / _TICK for name, value in zip(_MACHINE_FIELDS, values, strict=True)}
    seconds["busy"] = sum(seconds.values()) - seconds["idle"] - seconds["iowait"]
    return seconds
