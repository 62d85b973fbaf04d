"""The docs and the product code refer only to what a clone of the repository can follow.

Why: a pointer to a page outside the repository (a shared design page, a tracker's issue number)
or to a path on one machine reads as an explanation but leads nowhere for the next reader. The
project's docs quote the rules they rely on instead, and decision records (docs/decisions/) say
why; commit messages carry the history.

What is searched: every tracked file outside tests/ (the docs, README, the product packages,
bench/, crds/, the build files). Tests may still name the findings they reproduce.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

UNFOLLOWABLE = re.compile(r"\.\./shared|DESIGN\.md|\b(?i:issue) \d+|/(?:home|root|work)/[\w.-]")


def _searched_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [
        name
        for name in listed.stdout.splitlines()
        if not name.startswith("tests/") and (ROOT / name).is_file()
    ]


def _findings() -> list[tuple[str, int, str]]:
    found = []
    for name in _searched_files():
        try:
            text = (ROOT / name).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if UNFOLLOWABLE.search(line):
                found.append((name, number, line.strip()))
    return found


def test_docs_and_code_refer_only_to_what_a_clone_can_follow() -> None:
    bad = [f"{name}:{number}: {line}" for name, number, line in _findings()]
    assert bad == [], "quote the rule or link a file of the repository instead:\n" + "\n".join(bad)


def test_the_pattern_finds_each_kind() -> None:
    samples = [
        "see ../shared/DESIGN.md",
        "as DESIGN.md draws it",
        "after Issue 10's changes",
        "the venv at /work/main/.venv/bin/python",
        "in /root/.cache",
        "under /home/alice/src",
    ]
    assert [s for s in samples if not UNFOLLOWABLE.search(s)] == []
    assert not UNFOLLOWABLE.search(
        "kopf issue #882 (github.com/nolar/kopf/issues/882), docs/design.md, tissue 3"
    )
