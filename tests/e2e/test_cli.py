"""The `billingproxy` admin commands, run as real subprocesses against a real database: clear
tables, idempotent credits, the ledger audit's exit status (1 on a finding), and one-line errors
with exit status 2 (never a traceback)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from support.access_log_lines import envoy_log_line

from billing import api_keys, audit, holds, pricing, wallets
from billing.usage import Usage
from billingproxy.devstack.local_stack import free_port

pytestmark = pytest.mark.integration

EMAIL = "cli-owner@example.com"
GRANT_NANO = 500_000_000


@pytest.fixture(scope="module")
async def db(launch_database) -> AsyncIterator[Any]:
    async with launch_database() as database:
        yield database


@pytest.fixture(scope="module")
async def wallet(db) -> wallets.Signup:
    """A wallet with its grant and one settled request (a usage entry)."""
    async with db.engine.begin() as conn:
        created = await wallets.signup(conn, email=EMAIL, grant_nano=GRANT_NANO)
    async with db.engine.begin() as conn:
        refusal = await holds.place(
            conn,
            request_id="req-cli-1",
            wallet_id=created.wallet.id,
            key_id=created.key.key_id,
            model="gpt-4o-mini",
            amount_nano=1_000_000,
            ttl_s=600,
            strict=False,
        )
        assert refusal is None
        await holds.settle(
            conn, request_id="req-cli-1", resolution=holds.Resolution.post(10_950), details={"status": 200}
        )
    return created


def usd(nano: int) -> str:
    """USD as the CLI shows it: at least six decimals, more only when needed to be exact."""
    whole, _, frac = format((Decimal(nano) / 10**9).normalize(), "f").partition(".")
    return f"{whole}.{frac.ljust(6, '0')}"


def assert_one_line_error(result, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("billingproxy: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


async def test_wallet_show_prints_the_wallet_and_its_keys(db, wallet) -> None:
    for ref in (EMAIL.upper(), wallet.wallet.id):
        result = await db.acli("wallet", "show", ref)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].split() == [
            "WALLET",
            "OWNER",
            "SOURCE",
            "BALANCE_USD",
            "RESERVED_USD",
            "OVERDRAFT_LIMIT_USD",
            "STATE",
        ]
        balance = usd(await db.balance(wallet.wallet.id))
        # A self-service wallet has no overdraft.
        assert lines[1].split() == [
            wallet.wallet.id,
            EMAIL,
            "signup",
            balance,
            "0.000000",
            "0.000000",
            "active",
        ]
        [key_row] = [line.split() for line in lines if line.split()[:1] == [wallet.key.key_id]]
        assert key_row[2:4] == ["active", "*"]
        # What the key spent: exactly its usage entries (billing/key_management.py).
        assert key_row[5] == usd(await db.key_spend(wallet.key.key_id))
        assert wallet.key.plaintext not in result.stdout, "a key is shown only once, at issue"


async def test_credit_is_idempotent_on_its_reference(db, wallet) -> None:
    wallet_id = wallet.wallet.id
    before = await db.balance(wallet_id)
    first = await db.acli("wallet", "credit", EMAIL, "2.50", "--reference", "ticket-7")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == (
        f"{wallet_id}: credited 2.500000 USD; balance {usd(before + 2_500_000_000)} USD"
    )
    assert await db.balance(wallet_id) == before + 2_500_000_000

    again = await db.acli("wallet", "credit", wallet_id, "2.50", "--reference", "ticket-7")
    assert again.returncode == 0, again.stderr
    assert "already credited" in again.stdout
    assert await db.balance(wallet_id) == before + 2_500_000_000

    counts = await db.row_counts()
    conflict = await db.acli("wallet", "credit", EMAIL, "3.00", "--reference", "ticket-7")
    assert_one_line_error(conflict, "ticket-7", "already used", "2.500000")
    assert await db.row_counts() == counts
    credits = [e for e in await db.ledger(wallet_id) if e.kind == "credit"]
    assert [(e.amount_nano, e.idempotency_key) for e in credits] == [(2_500_000_000, "credit:ticket-7")]


async def test_bad_credits_are_refused_clearly(db, wallet) -> None:
    counts = await db.row_counts()
    assert_one_line_error(await db.acli("wallet", "credit", EMAIL, "ten", "--reference", "x"), "'ten'")
    assert_one_line_error(await db.acli("wallet", "credit", EMAIL, "0", "--reference", "x"), "more than zero")
    assert_one_line_error(
        await db.acli("wallet", "credit", "nobody@example.com", "1", "--reference", "x"),
        "no wallet",
        "nobody@example.com",
    )
    assert await db.row_counts() == counts


async def test_set_overdraft_sets_the_limit_the_next_check_uses(db) -> None:
    async with db.engine.begin() as conn:
        created = await wallets.signup(conn, email="overdraft@example.com", grant_nano=100)
    wallet_id = created.wallet.id

    async def place(request_id: str, amount_nano: int) -> holds.Refusal | None:
        async with db.engine.begin() as conn:
            return await holds.place(
                conn,
                request_id=request_id,
                wallet_id=wallet_id,
                key_id=created.key.key_id,
                model="gpt-4o-mini",
                amount_nano=amount_nano,
                ttl_s=600,
                strict=False,
            )

    refused = await place("before", 1_000)
    assert refused is not None
    assert (refused.reason, refused.shortfall) == (
        holds.RefusalReason.INSUFFICIENT_FUNDS,
        holds.Shortfall.REQUEST_TOO_LARGE,
    )
    done = await db.acli("wallet", "set-overdraft", "OVERDRAFT@example.com", "0.000001")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{wallet_id}: overdraft limit 0.000001 USD (was 0.000000)")
    assert "-0.000001 USD" in done.stdout
    assert await db.scalar("SELECT overdraft_limit_nano FROM wallets WHERE id = :id", id=wallet_id) == 1_000
    shown = (await db.acli("wallet", "show", wallet_id)).stdout.splitlines()[1].split()
    assert shown[3:6] == ["0.0000001", "0.000000", "0.000001"]
    assert await place("after", 1_000) is None  # admitted: 100 − 1 000 ≥ −1 000
    async with db.engine.begin() as conn:
        await holds.settle(conn, request_id="after", resolution=holds.Resolution.VOID)

    # Setting it again is idempotent; 0 takes the overdraft away.
    assert (await db.acli("wallet", "set-overdraft", wallet_id, "0")).returncode == 0
    assert await db.scalar("SELECT overdraft_limit_nano FROM wallets WHERE id = :id", id=wallet_id) == 0


async def test_bad_overdraft_limits_are_refused_clearly(db, wallet) -> None:
    counts = await db.row_counts()
    before = await db.scalar("SELECT overdraft_limit_nano FROM wallets WHERE id = :id", id=wallet.wallet.id)
    assert_one_line_error(await db.acli("wallet", "set-overdraft", EMAIL, "-1"), "negative")
    assert_one_line_error(await db.acli("wallet", "set-overdraft", EMAIL, "lots"), "'lots'")
    assert_one_line_error(
        await db.acli("wallet", "set-overdraft", EMAIL, "10000000"), "overdraft limit", "9999999"
    )
    assert_one_line_error(await db.acli("wallet", "set-overdraft", "nobody@example.com", "1"), "no wallet")
    assert (
        await db.scalar("SELECT overdraft_limit_nano FROM wallets WHERE id = :id", id=wallet.wallet.id)
        == before
    )
    assert await db.row_counts() == counts


async def test_key_revoke(db, wallet) -> None:
    unknown = await db.acli("key", "revoke", "key_doesnotexist")
    assert_one_line_error(unknown, "no key", "key_doesnotexist")

    async with db.engine.begin() as conn:
        spare = await api_keys.issue_key(conn, wallet_id=wallet.wallet.id, source="admin")
    revoked = await db.acli("key", "revoke", spare.key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.startswith(f"{spare.key_id} revoked at ")
    revoked_at = await db.scalar("SELECT revoked_at FROM api_keys WHERE id = :id", id=spare.key_id)
    assert revoked_at is not None
    shown = await db.acli("wallet", "show", EMAIL)
    (row,) = [line.split() for line in shown.stdout.splitlines() if line.startswith(spare.key_id)]
    assert "revoked" in row


async def test_usage_prints_a_table(db, wallet) -> None:
    result = await db.acli("usage", EMAIL, "--limit", "10")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.strip().splitlines()
    assert header.split() == ["ID", "TIME", "(UTC)", "KIND", "AMOUNT_USD", "BALANCE_USD", "WHAT"]
    kinds = [row.split()[3] for row in rows]
    entries = await db.ledger(wallet.wallet.id)
    assert kinds == [e.kind for e in reversed(entries)]  # newest first
    usage_row = rows[kinds.index("usage")].split()
    assert usage_row[4:7] == [usd(-10_950), usd(GRANT_NANO - 10_950), "gpt-4o-mini"]
    assert usage_row[4:6] == ["-0.00001095", "0.49998905"]


async def test_bad_settings_and_unreachable_database_are_one_line(db) -> None:
    bogus = await db.acli("wallet", "show", EMAIL, BILLINGPROXY_ADMISSION="bogus")
    assert_one_line_error(bogus, "BILLINGPROXY_ADMISSION", "'bogus'")
    port = await db.acli("wallet", "show", EMAIL, BILLINGPROXY_GATEWAY_PORT="70000")
    assert_one_line_error(port, "BILLINGPROXY_GATEWAY_PORT")
    not_postgres = await db.acli("wallet", "show", EMAIL, DATABASE_URL="mysql://root@127.0.0.1/x")
    assert_one_line_error(not_postgres, "DATABASE_URL", "postgresql://")
    down = await db.acli("wallet", "show", EMAIL, DATABASE_URL=f"postgresql://u:p@127.0.0.1:{free_port()}/x")
    assert_one_line_error(down, "cannot reach the database")


async def test_audit_of_clean_books_prints_every_check_and_exits_0(db, wallet) -> None:
    result = await db.acli("audit")
    assert result.returncode == 0, (result.stdout, result.stderr)
    header, *rows = result.stdout.strip().split("\n\n")[0].splitlines()
    assert header.split() == ["CHECK", "RULE", "CHECKED", "MISMATCHES"]
    assert [row.split()[0] for row in rows] == [check.label for check in audit.Check]
    assert all(row.split()[-1] == "0" for row in rows), result.stdout
    wallets_checked = await db.scalar("SELECT count(*) FROM wallets")
    assert rows[0].split()[-3:] == [str(wallets_checked), "wallets", "0"], rows[0]
    assert result.stdout.strip().splitlines()[-1].endswith(": the books are clean")

    as_json = await db.acli("audit", "--json")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert (report["clean"], report["findings"]) == (True, [])
    assert [c["check"] for c in report["checks"]] == [check.label for check in audit.Check]


async def test_audit_of_broken_books_names_each_finding_and_exits_1(launch_database) -> None:
    async with launch_database() as broken:
        async with broken.engine.begin() as conn:
            owner = await wallets.signup(conn, email="audit@example.com", grant_nano=GRANT_NANO)
            await conn.execute(
                sa.text(
                    "UPDATE wallets SET balance_nano = balance_nano + 1, reserved_nano = 5 WHERE id = :id"
                ),
                {"id": owner.wallet.id},
            )
        result = await broken.acli("audit")
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        table, found, verdict = result.stdout.strip().split("\n\n")
        mismatches = {row.split()[0]: row.split()[-1] for row in table.splitlines()[1:]}
        assert mismatches == {check.label: "0" for check in audit.Check} | {"balance": "1", "reserved": "1"}
        assert found.splitlines() == [
            f"{owner.wallet.id}  balance  wallet: expected balance {usd(GRANT_NANO)} USD "
            f"(Σ of its 1 entries); found balance {usd(GRANT_NANO + 1)} USD",
            f"{owner.wallet.id}  reserved  wallet: expected reserved 0.000000 USD "
            "(Σ of its 0 pending holds); found reserved 0.000000005 USD",
        ]
        assert verdict.endswith(": 2 mismatch(es)")
        as_json = await broken.acli("audit", "--json")
        assert as_json.returncode == 1
        assert [(f["check"], f["wallet_id"]) for f in json.loads(as_json.stdout)["findings"]] == [
            ("balance", owner.wallet.id),
            ("reserved", owner.wallet.id),
        ]
        # Put right, so the books check after this test finds this database clean too.
        async with broken.engine.begin() as conn:
            await conn.execute(
                sa.text(
                    "UPDATE wallets SET balance_nano = balance_nano - 1, reserved_nano = 0 WHERE id = :id"
                ),
                {"id": owner.wallet.id},
            )
        assert (await broken.acli("audit")).returncode == 0


async def test_audit_without_a_reachable_database_is_one_line(db, tmp_path) -> None:
    nowhere = await db.acli("audit", DATABASE_URL="", BILLINGPROXY_DATA_DIR=str(tmp_path))
    assert_one_line_error(nowhere, "no database", "DATABASE_URL")
    down = await db.acli("audit", DATABASE_URL=f"postgresql://u:p@127.0.0.1:{free_port()}/x")
    assert_one_line_error(down, "cannot reach the database")
    not_postgres = await db.acli("audit", "--json", DATABASE_URL="mysql://root@127.0.0.1/x")
    assert_one_line_error(not_postgres, "DATABASE_URL", "postgresql://")


async def test_reconcile_settles_what_the_grpc_access_log_never_delivered(db, tmp_path) -> None:
    """Holds whose access-log entries Envoy dropped (the sidecar was away) are settled from
    Envoy's JSON log: exact cost, voids, late posts after expiry; a second run changes nothing."""
    async with db.engine.begin() as conn:
        owner = await wallets.signup(conn, email="reconcile@example.com", grant_nano=GRANT_NANO)
    wallet_id, key_id = owner.wallet.id, owner.key.key_id

    async def place(request_id: str, ttl_s: int = 600) -> None:
        async with db.engine.begin() as conn:
            assert (
                await holds.place(
                    conn,
                    request_id=request_id,
                    wallet_id=wallet_id,
                    key_id=key_id,
                    model="gpt-4o-mini",
                    amount_nano=1_000_000,
                    ttl_s=ttl_s,
                    strict=False,
                )
                is None
            )

    for request_id in ("rec-ok", "rec-failed", "rec-timeout"):
        await place(request_id)
    await place("rec-late", ttl_s=0)  # past its expiry: reserved until its report comes

    hold = {"wallet-id": wallet_id, "key-id": key_id, "model": "gpt-4o-mini"}
    log = tmp_path / "envoy.log"
    log.write_text(
        "\n".join(
            [
                "[2026-11-25 11:41:09.001][1][info][main] starting main dispatch loop",
                envoy_log_line("rec-ok", 200, hold={**hold, "hold-id": "rec-ok"}, prompt=9, completion=16),
                envoy_log_line(
                    "rec-late", 200, hold={**hold, "hold-id": "rec-late"}, prompt=100, completion=10
                ),
                envoy_log_line("rec-failed", 500, hold={**hold, "hold-id": "rec-failed"}),
                envoy_log_line("rec-timeout", 503, hold=None),  # Envoy gave up on the Check: void by id
                envoy_log_line(
                    "rec-nobody", 200, hold={**hold, "hold-id": "rec-nobody"}, prompt=1, completion=1
                ),
                envoy_log_line("signup-1", 201, hold=None),  # a sidecar route: nothing to settle
                "{not json",
                "",
            ]
        )
        + "\n"
    )

    prices = pricing.load(None, Decimal(0))
    price = prices.price("gpt-4o-mini")
    ok_cost = prices.cost_nano(price, Usage.tokens(prompt_tokens=9, completion_tokens=16))
    late_cost = prices.cost_nano(price, Usage.tokens(prompt_tokens=100, completion_tokens=10))

    first = await db.acli("reconcile", str(log))
    assert first.returncode == 0, first.stderr
    assert table_of(first.stdout) == {
        "posted": "1",
        "posted_after_expiry": "1",
        "voided": "2",
        "unknown_hold": "1",
        "skipped: not an access-log line": "2",
        "skipped: nothing to settle (no hold)": "1",
    }
    assert await db.balance(wallet_id) == GRANT_NANO - ok_cost - late_cost
    states = {h.request_id: (h.state, h.posted_nano) for h in await db.holds(wallet_id)}
    assert states == {
        "rec-ok": ("posted", ok_cost),
        "rec-late": ("posted", late_cost),
        "rec-failed": ("voided", None),
        "rec-timeout": ("voided", None),
    }
    assert await db.pending_holds(wallet_id) == 0

    again = await db.acli("reconcile", str(log))
    assert again.returncode == 0, again.stderr
    assert table_of(again.stdout) == {
        "already_posted": "2",
        "already_voided": "2",
        "unknown_hold": "1",
        "skipped: not an access-log line": "2",
        "skipped: nothing to settle (no hold)": "1",
    }
    assert await db.balance(wallet_id) == GRANT_NANO - ok_cost - late_cost
    assert await db.invariants() == []


async def test_reconcile_names_an_unreadable_log(db, tmp_path) -> None:
    assert_one_line_error(
        await db.acli("reconcile", str(tmp_path / "missing.log")), "cannot read", "missing.log"
    )


def table_of(stdout: str) -> dict[str, str]:
    lines = stdout.strip().splitlines()
    assert lines[0].split() == ["OUTCOME", "REQUESTS"]
    return {line.rsplit(None, 1)[0].strip(): line.rsplit(None, 1)[1] for line in lines[1:]}
