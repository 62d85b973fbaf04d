"""Fixtures of the fault tests: the e2e stack (``launch_stack``, tests/e2e/conftest.py), and the
same stack on a PostgreSQL of its own, which a test may stop and start again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from billingproxy.devstack.postgres_server import EmbeddedPostgres


@pytest.fixture(scope="session")
def launch_stack_own_postgres(launch_stack) -> Callable[..., contextlib.AbstractAsyncContextManager[Any]]:
    """``async with launch_stack_own_postgres(BILLINGPROXY_X="…") as stack``: ``launch_stack``'s
    gateway, but on an embedded PostgreSQL the Stack starts itself (no DATABASE_URL), as
    ``billingproxy up`` does — the only kind ``Stack.stop_postgres`` may stop. Its cluster is
    destroyed afterwards (as root it may live outside the data dir)."""

    @contextlib.asynccontextmanager
    async def launch(**settings: str) -> AsyncIterator[Any]:
        data_dir = None
        try:
            async with launch_stack(DATABASE_URL="", **settings) as running:
                data_dir = running.stack.settings.data_dir
                assert running.stack.embedded_postgres is not None
                yield running
        finally:
            if data_dir is not None:
                await asyncio.to_thread(EmbeddedPostgres(data_dir / "postgres").destroy)

    return launch
