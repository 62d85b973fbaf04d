"""The sidecar's follower of Envoy's JSON access-log file, against a real PostgreSQL: the test
writes the file as Envoy does (appends whole lines, renames on rotation, a new file on reopen).

What must hold: every request whose hold is unresolved is settled exactly as the gRPC log would
have (same prices, same statement); what the gRPC log settled is not touched; the offset saved in
PostgreSQL only covers lines whose settlement committed, and a new follower resumes there; a
rotated file is read to its end before the new one; the follower's own rotation keeps at most two
files; while the database is down, its lag gauge shows the unsettled bytes and its failed rounds
are counted (what the chart's alerts watch). The real Envoy writes and reopens the file in
tests/e2e/test_access_log_file.py.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from support.access_log_lines import envoy_log_line

from authz_sidecar import metrics
from authz_sidecar.access_log import Settler
from authz_sidecar.access_log_file import ROTATED_SUFFIX, Follower
from billing import database, holds, pricing, wallets
from billing.usage import Usage

pytestmark = pytest.mark.integration

GRANT_NANO = 500_000_000
HOLD_NANO = 1_000_000
MODEL = "gpt-4o-mini"
PRICES = pricing.load(None, Decimal(0))


class Wallet:
    def __init__(self, pool: asyncpg.Pool, wallet_id: str, key_id: str) -> None:
        self.pool, self.wallet_id, self.key_id = pool, wallet_id, key_id

    @property
    def hold(self) -> dict[str, str]:
        return {"wallet-id": self.wallet_id, "key-id": self.key_id, "model": MODEL}

    def line(self, request_id: str, status: int = 200, *, prompt: int = 10, completion: int = 5) -> str:
        return envoy_log_line(
            request_id,
            status,
            hold={**self.hold, "hold-id": request_id},
            prompt=prompt,
            completion=completion,
        )

    async def try_place(self, request_id: str) -> holds.Refusal | None:
        """The Check's hold for ``request_id``; its refusal, if any."""
        async with database.acquire(self.pool) as conn:
            return await holds.place(
                conn,
                request_id=request_id,
                wallet_id=self.wallet_id,
                key_id=self.key_id,
                model=MODEL,
                amount_nano=HOLD_NANO,
                ttl_s=600,
                strict=False,
            )

    async def place(self, *request_ids: str) -> None:
        for request_id in request_ids:
            assert await self.try_place(request_id) is None

    async def states(self) -> dict[str, tuple[str, int | None]]:
        rows = await self.pool.fetch(
            "SELECT request_id, state, posted_nano FROM holds WHERE wallet_id = $1", self.wallet_id
        )
        return {row["request_id"]: (row["state"], row["posted_nano"]) for row in rows}

    async def balance(self) -> int:
        balance: int = await self.pool.fetchval(
            "SELECT balance_nano FROM wallets WHERE id = $1", self.wallet_id
        )
        return balance


@pytest.fixture
async def wallet(migrated_engine: AsyncEngine, migrated_pool: asyncpg.Pool) -> Wallet:
    async with migrated_engine.begin() as conn:
        owner = await wallets.signup(conn, email="file-log@example.com", grant_nano=GRANT_NANO)
    return Wallet(migrated_pool, owner.wallet.id, owner.key.key_id)


def follower(pool: asyncpg.Pool, path: Path, *, rotate_bytes: int = 1 << 30) -> Follower:
    # No Envoy here: asking it to reopen fails quietly, as when Envoy is restarting.
    return Follower(
        Settler(pool, PRICES),
        pool,
        path,
        rotate_bytes=rotate_bytes,
        admin_socket=path.parent / "no-envoy.sock",
    )


def append(path: Path, *lines: str, end: str = "\n") -> None:
    with path.open("a", encoding="utf-8") as file:
        file.write("\n".join(lines) + end)


def cost(prompt: int = 10, completion: int = 5) -> int:
    price = PRICES.price(MODEL)
    assert price is not None
    return PRICES.cost_nano(price, Usage.tokens(prompt_tokens=prompt, completion_tokens=completion))


async def saved_position(pool: asyncpg.Pool) -> int:
    positions = await pool.fetch("SELECT position FROM access_log_cursors")
    assert len(positions) == 1
    position: int = positions[0]["position"]
    return position


async def test_settles_what_the_grpc_log_did_not_and_leaves_the_rest(wallet: Wallet, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    await wallet.place("lost-ok", "lost-failed", "grpc-settled")
    async with database.acquire(wallet.pool) as conn:  # the gRPC log already charged this one
        await holds.settle(conn, request_id="grpc-settled", resolution=holds.Resolution.post(7))
    append(
        path,
        "[2026-12-02 10:00:00.000][1][info][main] an Envoy log line in the file",
        wallet.line("lost-ok", prompt=9, completion=16),
        wallet.line("lost-failed", 500),
        wallet.line("grpc-settled", prompt=1000, completion=1000),
        envoy_log_line("signup", 201, hold=None),
    )
    follow = follower(wallet.pool, path)
    assert await follow.follow_once() == 2
    assert await wallet.states() == {
        "lost-ok": ("posted", cost(9, 16)),
        "lost-failed": ("voided", None),
        "grpc-settled": ("posted", 7),  # not charged again, nor re-priced from the file
    }
    assert await wallet.balance() == GRANT_NANO - cost(9, 16) - 7
    assert await saved_position(wallet.pool) == path.stat().st_size
    assert await follow.follow_once() == 0  # nothing new
    follow.close()


async def test_a_refused_checks_line_voids_a_hold_placed_after_it(wallet: Wallet, tmp_path: Path) -> None:
    """Envoy gave up on a slow Check (503, no metadata) and its gRPC report was lost: the file's
    line leaves a void in the request id's place, so the hold the Check commits later is refused
    and moves no money. A refusal whose hold is already resolved is left alone."""
    path = tmp_path / "access.log"
    await wallet.place("gave-up-after-hold")
    append(
        path,
        envoy_log_line("gave-up-before-hold", 503, hold=None),
        envoy_log_line("gave-up-after-hold", 503, hold=None),
    )
    follow = follower(wallet.pool, path)
    assert await follow.follow_once() == 2
    assert await follow.follow_once() == 0  # nothing new, and nothing settled twice
    follow.close()
    refusal = await wallet.try_place("gave-up-before-hold")
    assert refusal is not None and refusal.reason is holds.RefusalReason.DUPLICATE_REQUEST
    assert await wallet.states() == {"gave-up-after-hold": ("voided", None)}
    assert await wallet.balance() == GRANT_NANO
    reserved = await wallet.pool.fetchval("SELECT reserved_nano FROM wallets WHERE id = $1", wallet.wallet_id)
    assert reserved == 0


async def test_a_line_still_being_written_waits_for_its_end(wallet: Wallet, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    await wallet.place("first", "second")
    complete, partial = wallet.line("first"), wallet.line("second")
    append(path, complete, partial[:40], end="")
    follow = follower(wallet.pool, path)
    assert await follow.follow_once() == 1
    assert await saved_position(wallet.pool) == len(complete) + 1  # up to the end of the whole line
    assert (await wallet.states())["second"] == ("pending", None)
    append(path, partial[40:])
    assert await follow.follow_once() == 1
    assert (await wallet.states())["second"] == ("posted", cost())
    follow.close()


async def test_a_new_follower_resumes_from_the_saved_offset(wallet: Wallet, tmp_path: Path) -> None:
    """What a follower settled is never read again by the next (a restarted or new sidecar): a
    hold placed afterwards under an id of a line already behind the offset stays untouched."""
    path = tmp_path / "access.log"
    await wallet.place("early")
    append(path, wallet.line("early"), wallet.line("read-before-its-hold"))
    first = follower(wallet.pool, path)
    assert await first.follow_once() == 1
    first.close()
    await wallet.place("read-before-its-hold", "late")
    append(path, wallet.line("late"))
    second = follower(wallet.pool, path)
    assert await second.follow_once() == 1
    states = await wallet.states()
    assert states["late"] == ("posted", cost())
    assert states["read-before-its-hold"] == ("pending", None)  # behind the offset: not re-read
    second.close()


async def test_a_failed_round_keeps_its_offset_and_the_next_settles_it(
    wallet: Wallet, tmp_path: Path
) -> None:
    """The database refuses the settlement (its pool is closed): the round raises, the offset
    stays where it was, and a follower with a working database settles those lines."""
    path = tmp_path / "access.log"
    await wallet.place("before-outage", "during-outage")
    append(path, wallet.line("before-outage"))
    follow = follower(wallet.pool, path)
    assert await follow.follow_once() == 1
    offset = await saved_position(wallet.pool)
    append(path, wallet.line("during-outage"))
    broken = Follower(
        Settler(_ClosedPool(), PRICES), _ClosedPool(), path, rotate_bytes=1 << 30, admin_socket=tmp_path / "x"
    )
    with pytest.raises(asyncpg.InterfaceError):
        await broken.follow_once()
    broken.close()
    assert await saved_position(wallet.pool) == offset
    assert await follow.follow_once() == 1
    assert (await wallet.states())["during-outage"] == ("posted", cost())
    follow.close()


async def test_while_the_database_is_down_the_lag_shows_the_unsettled_bytes_and_failures_count(
    wallet: Wallet, tmp_path: Path
) -> None:
    """The gauge comes from the file's size and the offset the follower holds, not from a round
    that succeeded: the alert on it can fire during the outage it is meant for."""
    path = tmp_path / "access.log"
    await wallet.place("before-outage", "during-1", "during-2")
    append(path, wallet.line("before-outage"))
    database_up = _Switchable(wallet.pool)
    follow = follower(database_up, path)  # type: ignore[arg-type]
    assert await follow.follow_once() == 1
    assert _sample("billingproxy_access_log_file_lag_bytes") == 0

    database_up.down = True
    settled_to = path.stat().st_size
    append(path, wallet.line("during-1"), wallet.line("during-2"))
    unsettled = path.stat().st_size - settled_to
    failures = _sample("billingproxy_access_log_file_failures_total")
    for round_ in (1, 2):
        with pytest.raises(asyncpg.InterfaceError):
            await follow.follow_once()
        assert _sample("billingproxy_access_log_file_lag_bytes") == unsettled
        assert _sample("billingproxy_access_log_file_failures_total") == failures + round_
    assert (await wallet.states())["during-1"] == ("pending", None)

    # A follower started during the outage cannot read its saved offset: the whole file counts.
    restarted = follower(database_up, path)  # type: ignore[arg-type]
    with pytest.raises(asyncpg.InterfaceError):
        await restarted.follow_once()
    assert _sample("billingproxy_access_log_file_lag_bytes") == path.stat().st_size
    restarted.close()

    database_up.down = False
    assert await follow.follow_once() == 2
    assert _sample("billingproxy_access_log_file_lag_bytes") == 0
    assert _sample("billingproxy_access_log_file_failures_total") == failures + 3
    follow.close()


def _sample(name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None, f"no metric {name}"
    return value


class _Switchable:
    """A real pool whose database can be made to go away (``down``) and come back."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool, self.down = pool, False

    def acquire(self) -> object:
        return _ClosedPool() if self.down else self.pool.acquire()


class _ClosedPool:
    """A pool whose database has gone away: every acquire fails as asyncpg's does."""

    def acquire(self) -> _ClosedPool:
        return self

    async def __aenter__(self) -> None:
        raise asyncpg.InterfaceError("pool is closed")

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_a_file_renamed_away_is_read_to_its_end_before_the_new_one(
    wallet: Wallet, tmp_path: Path
) -> None:
    """Someone else rotates (logrotate): Envoy writes to the renamed file until it reopens its
    log, then only to the new one. Lines in both are settled, the old file's first."""
    path = tmp_path / "access.log"
    await wallet.place("old-1", "old-2", "new-1")
    append(path, wallet.line("old-1"))
    follow = follower(wallet.pool, path)
    assert await follow.follow_once() == 1
    path.rename(tmp_path / "access.log.old")
    append(tmp_path / "access.log.old", wallet.line("old-2"))  # before Envoy reopened
    assert await follow.follow_once() == 1  # still the renamed file: no new one yet
    append(path, wallet.line("new-1"))  # Envoy reopened: a new file
    await follow.follow_once()
    await follow.follow_once()
    assert await wallet.states() == {name: ("posted", cost()) for name in ("old-1", "old-2", "new-1")}
    follow.close()


async def test_the_follower_rotates_and_keeps_one_rotated_file(wallet: Wallet, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    rotated = path.with_name(path.name + ROTATED_SUFFIX)
    line_bytes = len(wallet.line("r-00")) + 1
    follow = follower(wallet.pool, path, rotate_bytes=3 * line_bytes)
    ids = [f"r-{n:02d}" for n in range(9)]
    await wallet.place(*ids)

    append(path, *(wallet.line(request_id) for request_id in ids[:3]))
    assert await follow.follow_once() == 3  # settled to the end and past the size: rotated
    assert rotated.is_file() and not path.exists()
    append(rotated, wallet.line(ids[3]))  # Envoy has not reopened yet: it appends to the old file
    assert await follow.follow_once() == 1
    append(path, *(wallet.line(request_id) for request_id in ids[4:7]))  # reopened: a new file
    await follow.follow_once()
    await follow.follow_once()
    assert not path.exists()  # the new file reached the size too, and was rotated in turn
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("access.log")) == ["access.log.1"]
    append(path, *(wallet.line(request_id) for request_id in ids[7:]))
    while await follow.follow_once():
        pass
    assert await wallet.states() == {request_id: ("posted", cost()) for request_id in ids}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("access.log")) == [
        "access.log",
        "access.log.1",
    ]
    follow.close()


async def test_a_new_follower_finishes_the_rotated_file_first(wallet: Wallet, tmp_path: Path) -> None:
    """The sidecar restarts after a rotation, the rotated file not settled to its end: the new
    follower settles the rest of it, then the live file."""
    path = tmp_path / "access.log"
    rotated = path.with_name(path.name + ROTATED_SUFFIX)
    await wallet.place("a", "b", "c")
    append(path, wallet.line("a"))
    first = follower(wallet.pool, path)
    assert await first.follow_once() == 1
    first.close()
    path.rename(rotated)
    append(rotated, wallet.line("b"))
    append(path, wallet.line("c"))
    second = follower(wallet.pool, path)
    await second.follow_once()
    await second.follow_once()
    assert await wallet.states() == {name: ("posted", cost()) for name in "abc"}
    second.close()


async def test_a_line_naming_another_wallet_or_model_moves_no_money(
    wallet: Wallet, migrated_engine: AsyncEngine, tmp_path: Path
) -> None:
    """The file is trusted as the gRPC log is, no more: a line must agree with the hold the Check
    recorded (billing/holds.py SETTLE_SQL), or it is refused and the hold left for its true report."""
    async with migrated_engine.begin() as conn:
        other = await wallets.signup(conn, email="file-log-other@example.com", grant_nano=GRANT_NANO)
    path = tmp_path / "access.log"
    await wallet.place("victims-hold")
    forged_wallet = {**wallet.hold, "wallet-id": other.wallet.id, "hold-id": "victims-hold"}
    forged_model = {**wallet.hold, "model": "gpt-4o", "hold-id": "victims-hold"}
    follow = follower(wallet.pool, path)
    for forged in (forged_wallet, forged_model):  # one round each: a round keeps one line per id
        append(path, envoy_log_line("victims-hold", 200, hold=forged, prompt=1, completion=1))
        await follow.follow_once()
        assert await wallet.states() == {"victims-hold": ("pending", None)}
    assert await wallet.balance() == GRANT_NANO
    follow.close()
