"""Admin commands over the database: show and credit wallets, issue and revoke keys, list usage,
and the text of the ledger audit's report.

Each command is an async function that takes a connection and returns the text to print, so the
CLI stays a thin parser and tests call these directly. Errors are :class:`AdminError` with a
message meant for the person at the terminal. The audit is the exception: it opens its own
read-only snapshot (``billing.audit.run``), so only its report's text is here.
"""

from __future__ import annotations

import datetime as dt
import json

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from billing import api_keys, audit, errors, key_limits, key_management, ledger, money, tables, wallets


class AdminError(errors.UserFacingError):
    """A command that cannot be done as asked; the message says why and what to do."""


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]
    return "\n".join(lines)


async def _wallet(conn: AsyncConnection, ref: str) -> wallets.Wallet:
    wallet = await wallets.find_wallet(conn, ref)
    if wallet is None:
        raise AdminError(f"no wallet matches {ref!r} (give a wallet id wal_… or an owner email)")
    return wallet


async def wallet_show(conn: AsyncConnection, ref: str) -> str:
    wallet = await _wallet(conn, ref)
    keys = await key_management.list_keys(conn, wallet.id, include_revoked=True)
    now = dt.datetime.now(dt.UTC)
    head = table(
        ["WALLET", "OWNER", "SOURCE", "BALANCE_USD", "RESERVED_USD", "OVERDRAFT_LIMIT_USD", "STATE"],
        [
            [
                wallet.id,
                wallet.email or "-",
                wallet.source,
                money.format_usd(wallet.balance_nano),
                money.format_usd(wallet.reserved_nano),
                money.format_usd(wallet.overdraft_limit_nano),
                wallet.state.value,
            ]
        ],
    )
    key_rows = [
        [
            k.record.id,
            k.record.display_prefix + "…",
            k.state(now),
            ",".join(k.record.allowed_models) if k.record.allowed_models is not None else "*",
            k.last_used_at.isoformat(timespec="seconds") if k.last_used_at else "-",
            money.format_usd(k.spend_nano),
            _limit_text(k.limit),
        ]
        for k in keys
    ]
    columns = ["KEY", "PREFIX", "STATE", "MODELS", "LAST_USED", "SPEND_USD", "LIMIT"]
    return head + "\n\n" + (table(columns, key_rows) if key_rows else "(no keys)")


async def wallet_credit(conn: AsyncConnection, ref: str, amount_usd: str, reference: str) -> str:
    """A manual grant, idempotent on ``reference``: running it twice credits once."""
    try:
        amount = money.parse_usd(amount_usd)
    except money.MoneyError as exc:
        raise AdminError(str(exc)) from None
    if amount == 0:
        raise AdminError("the amount must be more than zero")
    if not reference.strip():
        raise AdminError("--reference must not be empty: it makes the credit idempotent")
    wallet = await _wallet(conn, ref)
    try:
        entry = await ledger.post_entry(
            conn,
            wallet_id=wallet.id,
            kind="credit",
            amount_nano=amount,
            idempotency_key=f"credit:{reference.strip()}",
            details={"reason": "manual credit", "reference": reference.strip()},
        )
    except ledger.IdempotencyConflict as exc:
        raise AdminError(
            f"reference {reference!r} was already used for a different credit "
            f"({money.format_usd(exc.first.amount_nano)} USD to {exc.first.wallet_id}); "
            "choose a new reference"
        ) from None
    verb = "credited" if entry.created else "already credited (nothing changed)"
    return (
        f"{wallet.id}: {verb} {money.format_usd(entry.amount_nano)} USD; "
        f"balance {money.format_usd(entry.balance_after_nano)} USD"
    )


async def wallet_set_overdraft(conn: AsyncConnection, ref: str, limit_usd: str) -> str:
    """Set how far below zero the wallet's balance may go (``0`` for none); the next Check uses it."""
    try:
        limit = wallets.check_overdraft_limit(money.parse_usd(limit_usd))
    except (money.MoneyError, wallets.OverdraftLimitInvalid) as exc:
        raise AdminError(str(exc)) from None
    wallet = await _wallet(conn, ref)
    updated = await wallets.set_overdraft_limit(conn, wallet.id, limit)
    assert updated is not None, "the wallet was found in this very transaction"
    return (
        f"{wallet.id}: overdraft limit {money.format_usd(limit)} USD "
        f"(was {money.format_usd(wallet.overdraft_limit_nano)}); requests are admitted while the balance "
        f"less reservations and the request's worst case stays at or above {money.format_usd(-limit)} USD"
    )


async def key_create(conn: AsyncConnection, ref: str, models: list[str] | None) -> str:
    wallet = await _wallet(conn, ref)
    issued = await api_keys.issue_key(conn, wallet_id=wallet.id, source="admin", allowed_models=models)
    return f"key {issued.key_id} for {wallet.id} (shown once, store it now):\n{issued.plaintext}"


async def key_revoke(conn: AsyncConnection, key_id: str) -> str:
    try:
        record = await api_keys.revoke_key(conn, key_id)
    except api_keys.KeyNotFound:
        raise AdminError(
            f"no key {key_id!r} (key ids look like key_…; see `billingproxy wallet show`)"
        ) from None
    assert record.revoked_at is not None, "revoke_key returns the key it stamped"
    return f"{record.id} revoked at {record.revoked_at.isoformat()}"


def _limit_text(limit: key_limits.KeyLimit | None) -> str:
    """``4.20/5.00 monthly, resets 2027-01-01T00:00:00Z`` (spent in the window / limit), or ``-``."""
    if limit is None:
        return "-"
    reset = limit.resets_at
    resets = "never resets" if reset is None else f"resets {key_limits.iso(reset)}"
    spent = money.format_usd(limit.spent_nano)
    return f"{spent}/{money.format_usd(limit.limit_nano)} {limit.window.value}, {resets}"


async def key_limit(conn: AsyncConnection, key_id: str, amount_usd: str | None, window: str) -> str:
    """Set a key's spend limit (``amount_usd`` None: remove it). A key an ApiKey resource owns is
    refused: its limit is the resource's ``spec.spendLimit``, which the operator would restore."""
    record = await api_keys.get_key(conn, key_id)
    if record is None:
        raise AdminError(f"no key {key_id!r} (key ids look like key_…; see `billingproxy wallet show`)")
    source = (
        await conn.execute(sa.select(tables.api_keys.c.source).where(tables.api_keys.c.id == key_id))
    ).scalar_one()
    if source == "kubernetes":
        raise AdminError(f"{key_id} belongs to an ApiKey resource: set its spec.spendLimit instead")
    if amount_usd is None:
        await key_limits.clear_limit(conn, key_id)
        return f"{key_id}: no spend limit"
    try:
        limit_nano, parsed = key_limits.parse({"usd": amount_usd, "window": window})
    except key_limits.InvalidLimit as exc:
        raise AdminError(str(exc)) from None
    await key_limits.set_limit(conn, key_id, limit_nano, parsed)
    return f"{key_id}: {_limit_text(await key_limits.limit_of(conn, key_id))}"


async def usage(conn: AsyncConnection, ref: str, limit: int) -> str:
    wallet = await _wallet(conn, ref)
    entries = await ledger.entries(conn, wallet.id, limit=limit)
    rows = [
        [
            str(e.id),
            e.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            e.kind,
            money.format_usd(e.amount_nano),
            money.format_usd(e.balance_after_nano),
            str(e.details.get("model", e.details.get("reason", ""))),
        ]
        for e in entries
    ]
    if not rows:
        return f"{wallet.id}: no ledger entries"
    return table(["ID", "TIME (UTC)", "KIND", "AMOUNT_USD", "BALANCE_USD", "WHAT"], rows)


def audit_table(report: audit.Report) -> str:
    """The audit as a person reads it: a row per check, a line per finding, and the verdict."""
    rows = [
        [r.check.label, r.check.rule, f"{r.checked} {r.check.counted}", str(r.mismatches)]
        for r in report.results
    ]
    lines = [table(["CHECK", "RULE", "CHECKED", "MISMATCHES"], rows)]
    findings = report.findings
    mismatches = sum(r.mismatches for r in report.results)
    if findings:
        lines += ["", *(str(finding) for finding in findings)]
    if mismatches > len(findings):
        lines.append(
            f"… and {mismatches - len(findings)} more (at most {audit.FINDINGS_LISTED_MAX} listed per check)"
        )
    verdict = "the books are clean" if report.clean else f"{mismatches} mismatch(es)"
    lines += ["", f"snapshot of {report.at.isoformat()}: {verdict}"]
    return "\n".join(lines)


def audit_json(report: audit.Report) -> str:
    """The same report for a program: ``clean``, one object per check and per finding."""
    return json.dumps(
        {
            "at": report.at.isoformat(),
            "clean": report.clean,
            "checks": [
                {
                    "check": r.check.label,
                    "rule": r.check.rule,
                    "checked": r.checked,
                    "counted": r.check.counted,
                    "mismatches": r.mismatches,
                }
                for r in report.results
            ],
            "findings": [
                {
                    "check": f.check.label,
                    "wallet_id": f.wallet_id,
                    "subject": f.subject,
                    "expected": f.expected,
                    "found": f.found,
                }
                for f in report.findings
            ],
        },
        indent=2,
        ensure_ascii=False,
    )
