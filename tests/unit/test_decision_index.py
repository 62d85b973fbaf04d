"""docs/decisions/README.md lists every decision record, with the status the record states.

Why: the index is how a reader finds a record; one added without a row, or a status changed in
the record alone, makes the index lie quietly.
"""

from __future__ import annotations

import re
from pathlib import Path

DECISIONS = Path(__file__).resolve().parents[2] / "docs" / "decisions"


def _records() -> dict[str, str]:
    """File name → the status its third line states."""
    records = {}
    for path in sorted(DECISIONS.glob("[0-9][0-9][0-9][0-9]-*.md")):
        line = path.read_text(encoding="utf-8").splitlines()[2]
        match = re.search(r"Status: ([^.]+)\.", line)
        assert match, f"{path.name}: line 3 names no status: {line!r}"
        records[path.name] = match[1]
    return records


def _index() -> dict[str, str]:
    text = (DECISIONS / "README.md").read_text(encoding="utf-8")
    return {
        name: status
        for name, status in re.findall(r"^\| \[\d{4}\]\(([^)]+)\) \| .+ \| ([^|]+) \|$", text, re.M)
    }


def test_the_index_lists_every_record_with_its_status() -> None:
    assert _index() == _records()
