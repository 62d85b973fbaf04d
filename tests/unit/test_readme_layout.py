"""The README's repository table lists every top-level folder of the tree (and nothing gone).

Why: the table is how a newcomer finds their way; a folder added without a row, or a row left
behind by a move, makes it lie quietly.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _table_paths() -> set[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Repository", 1)[1]
    return set(re.findall(r"^\| `([^`]+)` \|", section, re.MULTILINE))


def _tracked_folders() -> set[str]:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return {line.split("/", 1)[0] for line in files.splitlines() if "/" in line and not line.startswith(".")}


def test_every_top_level_folder_has_a_row() -> None:
    rows = _table_paths()
    missing = [
        folder
        for folder in sorted(_tracked_folders())
        if not any(row.startswith(folder + "/") for row in rows)
    ]
    assert missing == []


def test_every_row_names_a_folder_that_exists() -> None:
    assert [row for row in sorted(_table_paths()) if not (ROOT / row).is_dir()] == []
