"""`billingproxy migrate` as the chart's hook Job runs it: two runs at once take turns, and a
database that never answers fails the run with the clear message before Helm's hook timeout.

Why: the Job is retried (``backoffLimit``) and two releases can start theirs together; without a
lock the second run races the first on the same DDL. asyncpg's default connect timeout (60 s),
retried, outlasts Helm's 5-minute hook timeout, and Helm then says only "timed out"."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from billing import database

pytestmark = pytest.mark.integration

BILLINGPROXY = str(Path(sys.executable).with_name("billingproxy"))
#: Far above database.CONNECT_TIMEOUT_S and far below asyncpg's default 60 s: a run still waiting
#: at this bound has no connect timeout.
RUN_BOUND_S = 4 * database.CONNECT_TIMEOUT_S


def _env(database_url: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("BILLINGPROXY_")}
    env["DATABASE_URL"] = database_url
    return env


def _migrate(database_url: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BILLINGPROXY, "migrate"],
        capture_output=True,
        text=True,
        env=_env(database_url),
        timeout=timeout_s,
        check=False,
    )


async def test_two_migrations_at_once_both_succeed_with_one_schema(
    fresh_database_url: str, migrated_url: str
) -> None:
    runs = await asyncio.gather(*(asyncio.to_thread(_migrate, fresh_database_url) for _ in range(2)))
    for done in runs:
        assert done.returncode == 0, done.stderr
        assert "database schema is up to date" in done.stdout

    # The schema is the one a single run builds (the session's migrated template's).
    async def schema(url: str) -> tuple[list[tuple[str, ...]], list[str]]:
        connection = await asyncpg.connect(url)
        try:
            columns = await connection.fetch(
                "SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
                "WHERE table_schema = 'public' ORDER BY table_name, column_name"
            )
            indexes = await connection.fetch(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY indexdef"
            )
            versions = await connection.fetch("SELECT version_num FROM alembic_version")
        finally:
            await connection.close()
        rows = [tuple(row) for row in columns] + [(row["indexdef"],) for row in indexes]
        return rows, [row["version_num"] for row in versions]

    built, versions = await schema(fresh_database_url)
    expected, expected_versions = await schema(migrated_url)
    assert built == expected
    assert versions == expected_versions and len(versions) == 1


@pytest.fixture
def black_hole() -> Iterator[str]:
    """A PostgreSQL URL whose server never answers: the kernel completes the TCP handshake (the
    socket listens) but nothing ever accepts or replies, as a database behind a firewall that
    drops its packets after connecting. (TEST-NET addresses are refused at once on some machines,
    which tests nothing.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        yield f"postgresql://billing:secret@127.0.0.1:{port}/billing"


def test_a_database_that_never_answers_fails_the_run_with_the_clear_message(black_hole: str) -> None:
    try:
        done = _migrate(black_hole, timeout_s=RUN_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`billingproxy migrate` still waited for the database after {RUN_BOUND_S} s")
    assert done.returncode == 2, done.stderr
    line = done.stderr.splitlines()[-1]  # after Alembic's log lines
    assert line.startswith("billingproxy: cannot reach the database ("), line
    assert "Check DATABASE_URL" in line
    assert "secret" not in done.stderr + done.stdout
