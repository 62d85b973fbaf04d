"""Fixtures for the operator tests: kmock's Kubernetes API, a migrated PostgreSQL, the operator.

The status timers' interval is fixed when ``billing_operator`` is imported (kopf takes it from
the decorator), so it is set here, before any test module imports the package.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

os.environ["BILLINGPROXY_OPERATOR_STATUS_INTERVAL_S"] = "0.3"

import aiohttp
import kmock
import pytest
import yaml
from sqlalchemy.ext.asyncio import AsyncEngine

import kube_emulator
import operator_harness as harness
from billing import database
from billing_operator import settings as operator_settings

if operator_settings.STATUS_INTERVAL_S != 0.3:
    raise RuntimeError(
        "billing_operator was imported before tests/operator/conftest.py could set "
        "BILLINGPROXY_OPERATOR_STATUS_INTERVAL_S; run the operator tests in their own process "
        "or import billing_operator only from tests/operator"
    )

# Errors the emulator answers in normal operation; anything else is a broken emulator or test.
_EXPECTED_API_STATUSES = {404, 409, 422, 503}


@pytest.fixture
def database_url(migrated_url: str) -> str:
    return migrated_url


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = database.create_engine(database_url, pool_size=2)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def emulator() -> AsyncIterator[kube_emulator.Emulator]:
    async with kube_emulator.Emulator() as emulator, kmock.Server(emulator):
        kube_emulator.declare(emulator)
        yield emulator
        unexpected = [
            e
            for e in emulator.errors
            if not (isinstance(e, kmock.KubernetesError) and e.status in _EXPECTED_API_STATUSES)
        ]
        assert not unexpected, f"the Kubernetes emulator failed to serve requests: {unexpected!r}"


@pytest.fixture
def kubeconfig(emulator: kube_emulator.Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A kubeconfig naming the emulator: the operator logs in exactly as it would to a cluster."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "kmock",
                "clusters": [{"name": "kmock", "cluster": {"server": str(emulator.url).rstrip("/")}}],
                "users": [{"name": "tester", "user": {"token": "test-token"}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester"}}],
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return path


@pytest.fixture
async def kube(emulator: kube_emulator.Emulator) -> AsyncIterator[harness.Kube]:
    async with aiohttp.ClientSession(base_url=str(emulator.url)) as session:
        yield harness.Kube(session)


@pytest.fixture
def direct_settings(database_url: str) -> operator_settings.OperatorSettings:
    """The operator's settings for the tests, with PostgreSQL reached directly."""
    return operator_settings.OperatorSettings(
        database_url=database_url, retry_delay_s=0.2, kube_timeout_s=5.0, rotation_grace_s=3600
    )


@pytest.fixture
async def operator(
    direct_settings: operator_settings.OperatorSettings, kubeconfig: Path
) -> AsyncIterator[harness.OperatorThread]:
    async with harness.running(direct_settings) as running:
        yield running


@pytest.fixture
async def db_proxy(database_url: str) -> AsyncIterator[harness.TcpProxy]:
    """A cuttable relay to the test database; see ``proxied_settings``."""
    parts = urlsplit(database_url)
    proxy = harness.TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.open()
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def proxied_settings(
    direct_settings: operator_settings.OperatorSettings, db_proxy: harness.TcpProxy, database_url: str
) -> operator_settings.OperatorSettings:
    """The operator's settings with PostgreSQL reached through ``db_proxy``."""
    return dataclasses.replace(direct_settings, database_url=db_proxy.url(database_url))
