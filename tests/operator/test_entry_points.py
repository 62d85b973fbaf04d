"""The two ways to start the operator: `kopf run -m billing_operator` and `billingproxy operator`."""

from __future__ import annotations

import asyncio

import kopf.testing
import pytest

import operator_harness as h
from billingproxy import cli


async def test_kopf_run_dash_m_billing_operator(database_url, kubeconfig, kube, monkeypatch, engine) -> None:
    """The production command line, configured from the environment only."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("BILLINGPROXY_OPERATOR_RETRY_DELAY_S", "0.2")
    runner = kopf.testing.KopfRunner(["run", "-m", "billing_operator", "--standalone", "--all-namespaces"])
    # Entered and left from a thread: leaving joins the operator's thread, and the Kubernetes
    # API it talks to (kmock) lives on this loop, which must keep serving meanwhile.
    await asyncio.to_thread(runner.__enter__)
    try:
        uid = (await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"}))["metadata"]["uid"]
        await kube.wait_for("wallets", "team-a", h.is_ready)
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)
    assert runner.exit_code == 0
    (row,) = await h.wallet_rows(engine, uid)
    assert row.balance_nano == 500_000_000


def test_billingproxy_operator_refuses_to_start_without_a_database(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert cli.main(["operator"]) == 2
    assert "DATABASE_URL" in capsys.readouterr().err
