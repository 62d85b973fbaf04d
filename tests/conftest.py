"""Fixtures every test folder may use: one real PostgreSQL per session, one empty database per test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from urllib.parse import urlsplit

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from support import browser

from billing import database
from billingproxy.devstack import postgres_server


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server for the whole session: `DATABASE_URL` if set, else an embedded one (no fsync)."""
    if url := os.environ.get("DATABASE_URL"):
        yield url
        return
    server = postgres_server.EmbeddedPostgres(tmp_path_factory.mktemp("postgres"), durable=False)
    try:
        yield server.start()
    finally:
        # destroy, not stop: as root the cluster may live outside pytest's tmp dir (see the module).
        server.destroy()


NewDatabase = Callable[..., contextlib.AbstractAsyncContextManager[str]]


@pytest.fixture(scope="session")
def new_database(postgres_url: str) -> NewDatabase:
    """``async with new_database(prefix, migrate=…) as url``: a new database on the session's
    server (migrated by the real Alembic migrations when asked), dropped afterwards.

    Migrated ones are copies of one template that the real migrations brought to the head
    revision once per session (``CREATE DATABASE … TEMPLATE``): the same schema, without running
    twelve migrations for each of hundreds of tests."""
    template: dict[str, str] = {}
    template_lock = asyncio.Lock()

    async def admin_execute(sql: str) -> None:
        admin = await asyncpg.connect(postgres_url)
        try:
            await admin.execute(sql)
        finally:
            await admin.close()

    def url_of(name: str) -> str:
        return urlsplit(postgres_url)._replace(path=f"/{name}").geturl()

    async def migrated_template() -> str:
        async with template_lock:
            if "name" not in template:
                name = f"template_{uuid.uuid4().hex[:12]}"
                await admin_execute(f'CREATE DATABASE "{name}"')
                await asyncio.to_thread(database.migrate, url_of(name))
                template["name"] = name
        return template["name"]

    @contextlib.asynccontextmanager
    async def create(prefix: str = "test", *, migrate: bool = False) -> AsyncIterator[str]:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        source = f' TEMPLATE "{await migrated_template()}"' if migrate else ""
        await admin_execute(f'CREATE DATABASE "{name}"{source}')
        try:
            yield url_of(name)
        finally:
            await admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return create


@pytest.fixture
async def fresh_database_url(new_database: NewDatabase) -> AsyncIterator[str]:
    """A new, empty database on the session's server, dropped after the test."""
    async with new_database() as url:
        yield url


@pytest.fixture
async def migrated_url(new_database: NewDatabase) -> AsyncIterator[str]:
    """A new database brought to the head revision by the real Alembic migrations, dropped after."""
    async with new_database(migrate=True) as url:
        yield url


@pytest.fixture
async def migrated_engine(migrated_url: str) -> AsyncIterator[AsyncEngine]:
    """The transactional engine the services use, over a migrated database."""
    engine = database.create_engine(migrated_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def migrated_pool(migrated_url: str) -> AsyncIterator[asyncpg.Pool]:
    """The hot path's asyncpg pool over a migrated database (enough connections for races)."""
    pool = await database.create_pool(migrated_url, size=16)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's Chromium for the browser tests. Missing → installed with apt-get; impossible → the
    test fails (never skips): the browser journeys are part of `make test`."""
    path, problem = browser.chromium_path()
    if path is None:
        pytest.fail(
            f"headless Chromium is required for the browser tests: {problem}. "
            f"Install it with: apt-get update && apt-get install -y {browser.CHROMIUM_PACKAGE}"
        )
    return path


# --- markers by what a test needs (pyproject's [tool.pytest.ini_options] registers them) ----------
#
# Applied here, by folder and by fixture, so no test file has to remember them: `make test-fast`
# runs what needs none of them (no process started), `-m db` what needs PostgreSQL, and so on.

_BY_FOLDER = {
    "e2e": ("stack", "db", "envoy"),
    "stripe": ("stack", "db", "envoy"),
    "operator": ("kube",),
    "chart": ("chart",),
}
# Files outside those folders that start a process of their own.
_BY_FILE = {
    "test_postgres_server.py": ("db",),
    "test_envoy_config_validation.py": ("envoy",),
    "test_usage_filter.py": ("envoy",),
    "test_usage_properties.py": ("envoy",),
    "test_stripe_browser.py": ("browser",),
    "test_account_browser.py": ("browser",),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = item.path
        needs: set[str] = set()
        for folder, markers in _BY_FOLDER.items():
            if folder in path.parts:
                needs.update(markers)
        needs.update(_BY_FILE.get(path.name, ()))
        if "postgres_url" in getattr(item, "fixturenames", ()):
            needs.add("db")
        for marker in sorted(needs):
            item.add_marker(marker)
