"""The process tree, read from /proc: which processes a test started are still alive.

Why /proc and not the objects that started them: the question the tests ask is whether anything
outlives a stop, or which new process took a crashed one's place, and only the kernel knows that
for processes the test did not start itself (a sidecar a Stack restarted, `up`'s children)."""

from __future__ import annotations

from pathlib import Path


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), None if gone."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; the state follows the last ")".
    return stat[stat.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def descendants(pid: int) -> set[int]:
    """All live descendants of ``pid``."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(entry.name)) and fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def sidecars_under(pid: int) -> set[int]:
    """The live `billingproxy sidecar` processes among the descendants of ``pid``."""
    found = set()
    for child in descendants(pid):
        try:
            argv = (Path("/proc") / str(child) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"billingproxy" in argv and b"sidecar" in argv:
            found.add(child)
    return found
