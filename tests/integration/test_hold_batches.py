"""billing.hold_batches.place_many / settle_many against a real PostgreSQL: a batch ends exactly as the
same calls one by one would, in one transaction; duplicates fall back to one-by-one without a
double reservation or charge; concurrent batches in opposite wallet orders do not deadlock.

Each test runs the same requests twice, on twin wallets: one by one (``holds.place``/``settle``) and as
a batch, and compares the outcomes, balances, reservations and ledger entries. Every test runs
twice more, once per way a batch is sent (``hold_batches.SET_BATCH_MIN``): each request's own statement,
pipelined, and the set-based statement over arrays.
"""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from billing import api_keys, audit, database, expiry, hold_batches, holds, ledger, tables, wallets
from row_locks import blocked_on_a_row_lock

pytestmark = pytest.mark.integration

ADMITTED = None  # what holds.place answers when it placed the hold: no refusal
S = holds.Settlement
VOID, ESTIMATE, post = holds.Resolution.VOID, holds.Resolution.POST_ESTIMATE, holds.Resolution.post
TTL_S = 600


async def new_wallet(engine: AsyncEngine, balance_nano: int, limit_nano: int = 0) -> tuple[str, str]:
    async with engine.begin() as conn:
        wallet = await wallets.create_wallet(
            conn, source="admin", grant_nano=balance_nano, overdraft_limit_nano=limit_nano
        )
        key = await api_keys.issue_key(conn, wallet_id=wallet.id, source="admin")
    return wallet.id, key.key_id


async def money(engine: AsyncEngine, wallet_id: str) -> tuple[int, int]:
    async with engine.connect() as conn:
        wallet = await wallets.get_wallet(conn, wallet_id)
    assert wallet is not None
    return wallet.balance_nano, wallet.reserved_nano


async def usage(engine: AsyncEngine, wallet_id: str) -> list[tuple[str, int, int]]:
    """(idempotency key, amount, balance after) of the wallet's usage entries, oldest first."""
    async with engine.connect() as conn:
        entries = await ledger.entries(conn, wallet_id, limit=1000)
    return sorted(
        ((e.idempotency_key, e.amount_nano, e.balance_after_nano) for e in entries if e.kind == "usage"),
        key=lambda e: e[0],
    )


async def invariants(engine: AsyncEngine) -> list:
    return (await audit.run(engine)).findings


@pytest.fixture(autouse=True, params=["pipelined", "set_based"])
def batch_statement(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every batch of two or more as the set-based statement, or none of them."""
    monkeypatch.setattr(hold_batches, "SET_BATCH_MIN", 2 if request.param == "set_based" else 10**9)
    return request.param


@pytest.fixture(autouse=True, params=["keys_unlimited", "keys_unknown"])
def key_statements(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The keys here have no spend limit: the batch's requests say so (as the sidecar's key cache
    does: the wallet-only statements), or do not know (the statements that read a limited key's
    row, which must admit an unlimited key's requests exactly the same)."""
    if request.param == "keys_unlimited":
        monkeypatch.setattr(hold_batches.HoldRequest.__init__, "__defaults__", (False,))
    return request.param


@pytest.fixture
async def pool(migrated_url: str):
    pool = await database.create_pool(migrated_url, size=4)
    try:
        yield pool
    finally:
        await pool.close()


def requests_for(
    wallet_id: str, key_id: str, amounts: list[int], prefix: str
) -> list[hold_batches.HoldRequest]:
    return [
        hold_batches.HoldRequest(f"{prefix}-{i}", wallet_id, key_id, "gpt-4o-mini", a)
        for i, a in enumerate(amounts)
    ]


@pytest.mark.parametrize("strict", [False, True], ids=["overdraft", "strict"])
async def test_a_batch_of_holds_admits_exactly_what_one_by_one_admits(
    migrated_engine: AsyncEngine, pool: asyncpg.Pool, strict: bool
) -> None:
    """Two wallets interleaved in one batch; each covers only some of its requests, so later
    requests in the batch must see the reservations of earlier ones in the same transaction."""
    rng = random.Random(3)
    amounts = [rng.randint(50_000, 400_000) for _ in range(12)]
    twins = {}
    for mode in ("one_by_one", "batch"):
        rich, rich_key = await new_wallet(migrated_engine, 10_000_000)
        poor, poor_key = await new_wallet(migrated_engine, 700_000)
        reqs = [
            r
            for pair in zip(
                requests_for(poor, poor_key, amounts, f"{mode}-p"),
                requests_for(rich, rich_key, amounts, f"{mode}-r"),
                strict=True,
            )
            for r in pair
        ]
        async with pool.acquire() as conn:
            if mode == "batch":
                outcomes = await hold_batches.place_many(conn, reqs, ttl_s=TTL_S, strict=strict)
            else:
                outcomes = [
                    await holds.place(
                        conn,
                        request_id=r.request_id,
                        wallet_id=r.wallet_id,
                        key_id=r.key_id,
                        model=r.model,
                        amount_nano=r.amount_nano,
                        ttl_s=TTL_S,
                        strict=strict,
                    )
                    for r in reqs
                ]
        twins[mode] = (
            [o if o is ADMITTED else o.reason for o in outcomes],
            await money(migrated_engine, poor),
            await money(migrated_engine, rich),
        )
    assert twins["batch"] == twins["one_by_one"]
    admitted, poor_money, rich_money = twins["batch"]
    assert ADMITTED in admitted[0::2] and any(o is not ADMITTED for o in admitted[0::2]), (
        "the poor wallet must admit some and refuse others"
    )
    assert all(o is ADMITTED for o in admitted[1::2])
    assert rich_money == (10_000_000, sum(amounts))
    assert await invariants(migrated_engine) == []


@pytest.mark.parametrize("strict", [False, True], ids=["overdraft", "strict"])
async def test_a_batch_within_an_overdraft_limit_admits_exactly_what_one_by_one_admits(
    migrated_engine: AsyncEngine, pool: asyncpg.Pool, strict: bool
) -> None:
    """A wallet with an overdraft limit, requests of every size in one batch: some larger than
    all it may spend, small ones after a refused large one (which the batch's prefix rule leaves
    to ``place`` one by one). Outcomes, refusals and money equal the one-by-one run's."""
    amounts = [200_000, 900_000, 150_000, 50_000, 400_000, 10_000, 1_000_000, 5_000, 120_000, 1, 700_001, 2]
    twins = {}
    for mode in ("one_by_one", "batch"):
        wallet, key = await new_wallet(migrated_engine, 300_000, limit_nano=400_000)
        other, other_key = await new_wallet(migrated_engine, 100_000, limit_nano=50_000)
        reqs = [
            r
            for pair in zip(
                requests_for(wallet, key, amounts, f"{mode}-w"),
                requests_for(other, other_key, amounts, f"{mode}-o"),
                strict=True,
            )
            for r in pair
        ]
        async with pool.acquire() as conn:
            if mode == "batch":
                outcomes = await hold_batches.place_many(conn, reqs, ttl_s=TTL_S, strict=strict)
            else:
                outcomes = [
                    await holds.place(
                        conn,
                        request_id=r.request_id,
                        wallet_id=r.wallet_id,
                        key_id=r.key_id,
                        model=r.model,
                        amount_nano=r.amount_nano,
                        ttl_s=TTL_S,
                        strict=strict,
                    )
                    for r in reqs
                ]
        # A refusal's balance and reservations are read when it is explained, which in a batch is
        # after the whole batch: compare what was decided, not that snapshot.
        decided = [
            o if o is ADMITTED else (o.reason, o.shortfall, o.amount_nano, o.overdraft_limit_nano)
            for o in outcomes
        ]
        twins[mode] = (decided, await money(migrated_engine, wallet), await money(migrated_engine, other))
    assert twins["batch"] == twins["one_by_one"]
    outcomes = [
        o if o is ADMITTED else holds.Refusal(o[0], amount_nano=o[2], shortfall=o[1])
        for o in twins["batch"][0]
    ]
    (_, reserved), (_, other_reserved) = twins["batch"][1:]
    assert reserved <= 300_000 + (0 if strict else 400_000)
    assert other_reserved <= 100_000 + (0 if strict else 50_000)
    refused = [o for o in outcomes if o is not ADMITTED]
    assert {(o.reason, o.shortfall) for o in refused} == {
        (holds.RefusalReason.FUNDS_RESERVED, None),
        (holds.RefusalReason.INSUFFICIENT_FUNDS, holds.Shortfall.REQUEST_TOO_LARGE),
    }
    # A small request after a refused large one is still admitted (one by one, after the prefix).
    assert outcomes[2 * amounts.index(5_000)] is ADMITTED
    assert await invariants(migrated_engine) == []


async def test_a_retried_check_in_a_batch_reserves_once(
    migrated_engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    wallet, key = await new_wallet(migrated_engine, 1_000_000)
    first, second = requests_for(wallet, key, [100_000, 200_000], "r")
    async with pool.acquire() as conn:
        assert await hold_batches.place_many(conn, [first], ttl_s=TTL_S, strict=False) == [ADMITTED]
        # The batch's duplicate key rolls it back whole; one by one, the retry rides on its hold.
        assert await hold_batches.place_many(conn, [second, first], ttl_s=TTL_S, strict=False) == [
            ADMITTED,
            ADMITTED,
        ]
    assert await money(migrated_engine, wallet) == (1_000_000, 300_000)
    async with pool.acquire() as conn:
        # The same id twice in one batch: one reservation.
        (third,) = requests_for(wallet, key, [50_000], "again")
        assert await hold_batches.place_many(conn, [third, third], ttl_s=TTL_S, strict=False) == [
            ADMITTED,
            ADMITTED,
        ]
    assert await money(migrated_engine, wallet) == (1_000_000, 350_000)


async def test_a_batch_of_settlements_ends_as_one_by_one(
    migrated_engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    """Posted, voided, charged the hold, unknown, already posted — in one batch over two wallets."""
    results = {}
    for mode in ("one_by_one", "batch"):
        a, a_key = await new_wallet(migrated_engine, 1_000_000)
        b, b_key = await new_wallet(migrated_engine, 1_000_000)
        reqs = requests_for(a, a_key, [100_000, 100_000, 100_000], f"{mode}-a") + requests_for(
            b, b_key, [100_000, 100_000], f"{mode}-b"
        )
        async with pool.acquire() as conn:
            assert await hold_batches.place_many(conn, reqs, ttl_s=TTL_S, strict=False) == [ADMITTED] * 5
            assert await holds.settle(conn, request_id=f"{mode}-b-1", resolution=post(5)) is S.POSTED
        settlements = [
            hold_batches.SettleRequest(f"{mode}-b-0", post(11_111), {"prompt_tokens": 3}, wallet_id=b),
            hold_batches.SettleRequest(f"{mode}-a-0", post(22_222), wallet_id=a),
            hold_batches.SettleRequest(f"{mode}-a-1", VOID, wallet_id=a),
            hold_batches.SettleRequest(f"{mode}-a-2", ESTIMATE, wallet_id=a),
            hold_batches.SettleRequest(f"{mode}-nobody", post(1)),
            hold_batches.SettleRequest(f"{mode}-b-1", post(7), wallet_id=b),  # its usage entry exists already
        ]
        async with pool.acquire() as conn:
            if mode == "batch":
                outcomes = await hold_batches.settle_many(conn, settlements)
            else:
                outcomes = [
                    await holds.settle(
                        conn, request_id=s.request_id, resolution=s.resolution, details=s.details
                    )
                    for s in settlements
                ]
        results[mode] = (
            outcomes,
            await money(migrated_engine, a),
            await money(migrated_engine, b),
            [
                (k.split("-", 2)[-1], amount, after)
                for k, amount, after in await usage(migrated_engine, a) + await usage(migrated_engine, b)
            ],
        )
    assert results["batch"] == results["one_by_one"]
    outcomes, a_money, b_money, _ = results["batch"]
    assert outcomes == [S.POSTED, S.POSTED, S.VOIDED, S.POSTED, S.UNKNOWN_HOLD, S.ALREADY_POSTED]
    assert a_money == (1_000_000 - 22_222 - 100_000, 0)
    assert b_money == (1_000_000 - 5 - 11_111, 0)
    assert await invariants(migrated_engine) == []


async def test_settlements_of_one_wallet_in_a_batch_chain_their_balances(
    migrated_engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    wallet, key = await new_wallet(migrated_engine, 1_000_000)
    reqs = requests_for(wallet, key, [50_000] * 6, "r")
    async with pool.acquire() as conn:
        await hold_batches.place_many(conn, reqs, ttl_s=TTL_S, strict=False)
        outcomes = await hold_batches.settle_many(
            conn,
            [
                hold_batches.SettleRequest(r.request_id, post(1_000 * (i + 1)), wallet_id=wallet)
                for i, r in enumerate(reqs)
            ],
        )
    assert outcomes == [S.POSTED] * 6
    async with migrated_engine.connect() as conn:
        entries = [e for e in await ledger.entries(conn, wallet, limit=100) if e.kind == "usage"]
    entries.sort(key=lambda e: e.id)
    balance = 1_000_000
    for entry in entries:  # each entry's balance_after follows from the one before
        balance += entry.amount_nano
        assert entry.balance_after_nano == balance
    assert await money(migrated_engine, wallet) == (1_000_000 - 21_000, 0)


async def test_a_batch_inside_a_callers_transaction_is_undone_with_it(migrated_engine: AsyncEngine) -> None:
    wallet, key = await new_wallet(migrated_engine, 1_000_000)
    reqs = requests_for(wallet, key, [100_000, 100_000], "r")
    async with migrated_engine.connect() as conn:
        transaction = await conn.begin()
        assert await hold_batches.place_many(conn, reqs, ttl_s=TTL_S, strict=False) == [ADMITTED] * 2
        assert await money_in(conn, wallet) == (1_000_000, 200_000)
        await transaction.rollback()
    assert await money(migrated_engine, wallet) == (1_000_000, 0)
    async with migrated_engine.connect() as conn:
        held = (
            await conn.execute(
                sa.select(sa.func.count()).select_from(tables.holds).where(tables.holds.c.wallet_id == wallet)
            )
        ).scalar_one()
    assert held == 0


async def money_in(conn, wallet_id: str) -> tuple[int, int]:
    wallet = await wallets.get_wallet(conn, wallet_id)
    assert wallet is not None
    return wallet.balance_nano, wallet.reserved_nano


async def test_concurrent_batches_in_opposite_wallet_orders_do_not_deadlock(
    migrated_engine: AsyncEngine, migrated_url: str
) -> None:
    """Batch i lists wallet A's requests before B's, batch i+1 the reverse; every batch locks
    wallet rows in id order, so none waits for another in a cycle (PostgreSQL would abort it)."""
    a, a_key = await new_wallet(migrated_engine, 10**12)
    b, b_key = await new_wallet(migrated_engine, 10**12)
    pool = await database.create_pool(migrated_url, size=8)
    try:
        batches = []
        for i in range(16):
            ra = requests_for(a, a_key, [1_000] * 4, f"{i}-a")
            rb = requests_for(b, b_key, [1_000] * 4, f"{i}-b")
            batches.append(
                [
                    x
                    for pair in (zip(ra, rb, strict=True) if i % 2 else zip(rb, ra, strict=True))
                    for x in pair
                ]
            )

        async def run(batch: list[hold_batches.HoldRequest]) -> list:
            async with pool.acquire() as conn:
                placed = await hold_batches.place_many(conn, batch, ttl_s=TTL_S, strict=False)
            settle = [
                hold_batches.SettleRequest(r.request_id, post(10), wallet_id=r.wallet_id)
                for r in reversed(batch)
            ]
            async with pool.acquire() as conn:
                return placed + await hold_batches.settle_many(conn, settle)

        outcomes = await asyncio.wait_for(asyncio.gather(*(run(batch) for batch in batches)), timeout=60)
    finally:
        await pool.close()
    assert all(o == [ADMITTED] * 8 + [S.POSTED] * 8 for o in outcomes)
    assert await money(migrated_engine, a) == (10**12 - 16 * 4 * 10, 0)
    assert await money(migrated_engine, b) == (10**12 - 16 * 4 * 10, 0)
    assert await invariants(migrated_engine) == []


async def test_a_batch_that_fails_midway_changes_nothing_and_is_redone_one_by_one(
    migrated_engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    """The second settlement of the batch hits an existing usage entry (a pending hold whose
    ``usage:`` key is taken — as a lost race would leave it). The batch must roll back whole, so
    the first settlement, redone alone, is posted exactly once."""
    wallet, key = await new_wallet(migrated_engine, 1_000_000)
    first, clash = requests_for(wallet, key, [100_000, 100_000], "r")
    async with pool.acquire() as conn:
        assert (
            await hold_batches.place_many(conn, [first, clash], ttl_s=TTL_S, strict=False) == [ADMITTED] * 2
        )
    async with migrated_engine.begin() as conn:
        await ledger.post_entry(
            conn, wallet_id=wallet, kind="usage", amount_nano=-1, idempotency_key=f"usage:{clash.request_id}"
        )
    async with pool.acquire() as conn:
        outcomes = await hold_batches.settle_many(
            conn,
            [
                hold_batches.SettleRequest(first.request_id, post(30_000), wallet_id=wallet),
                hold_batches.SettleRequest(clash.request_id, post(30_000), wallet_id=wallet),
            ],
        )
    assert outcomes == [S.POSTED, S.ALREADY_POSTED]
    assert await usage(migrated_engine, wallet) == [
        ("usage:r-0", -30_000, 1_000_000 - 1 - 30_000),
        ("usage:r-1", -1, 1_000_000 - 1),
    ]
    assert await money(migrated_engine, wallet) == (1_000_000 - 1 - 30_000, 100_000)


@pytest.mark.parametrize("step", ["place", "settle"])
async def test_a_batch_locks_its_wallets_in_id_order_whatever_its_own_order(
    migrated_engine: AsyncEngine, pool: asyncpg.Pool, step: str
) -> None:
    """The rule that keeps two batches from deadlocking, checked directly (the test above can
    only catch a break by chance): a batch that lists the higher wallet id first, blocked on the
    lower one, holds no lock on the higher one yet."""
    low, high = sorted([await new_wallet(migrated_engine, 1_000_000) for _ in range(2)])
    reqs = requests_for(high[0], high[1], [1_000] * 2, "h") + requests_for(low[0], low[1], [1_000] * 2, "l")
    if step == "settle":
        async with pool.acquire() as conn:
            assert await hold_batches.place_many(conn, reqs, ttl_s=TTL_S, strict=False) == [ADMITTED] * 4

    async def batch() -> list:
        async with pool.acquire() as conn:
            if step == "place":
                return await hold_batches.place_many(conn, reqs, ttl_s=TTL_S, strict=False)
            return await hold_batches.settle_many(
                conn,
                [hold_batches.SettleRequest(r.request_id, post(10), wallet_id=r.wallet_id) for r in reqs],
            )

    async with pool.acquire() as blocker, pool.acquire() as probe:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM wallets WHERE id = $1 FOR UPDATE", low[0])
            running = asyncio.create_task(batch())
            await blocked_on_a_row_lock(migrated_engine)
            async with probe.transaction():
                # Raises LockNotAvailableError if the batch had locked the higher wallet first.
                await probe.execute("SELECT 1 FROM wallets WHERE id = $1 FOR NO KEY UPDATE NOWAIT", high[0])
            assert not running.done()
        outcomes = await asyncio.wait_for(running, timeout=10)
    assert outcomes == ([ADMITTED] * 4 if step == "place" else [S.POSTED] * 4)
    assert await invariants(migrated_engine) == []


async def test_the_expiry_sweep_locks_wallets_in_id_order(
    migrated_engine: AsyncEngine, pool: asyncpg.Pool
) -> None:
    """The sweep's charge of unreported holds takes the same lock order as the batches (wallets
    by id), so it cannot deadlock with one: blocked on the lowest wallet of those it charges, it
    holds no lock on a higher one.
    Ten wallets, so a sweep that locked them in its plan's order (a hash of the ids) would hold
    a higher one here nine times in ten."""
    wallets_ = sorted([await new_wallet(migrated_engine, 1_000_000) for _ in range(10)])
    reqs = [
        r
        for n, (wallet_id, key_id) in enumerate(wallets_)
        for r in requests_for(wallet_id, key_id, [1_000], f"x{n}")
    ]
    async with pool.acquire() as conn:
        assert await hold_batches.place_many(conn, reqs, ttl_s=TTL_S, strict=False) == [ADMITTED] * len(reqs)
        await conn.execute("UPDATE holds SET expires_at = now() - interval '1 second'")

    async def sweep() -> int:
        async with pool.acquire() as conn:
            return (await expiry.sweep(conn, report_grace_s=0)).charged

    lowest = wallets_[0][0]
    async with pool.acquire() as blocker, pool.acquire() as probe:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM wallets WHERE id = $1 FOR UPDATE", lowest)
            running = asyncio.create_task(sweep())
            await blocked_on_a_row_lock(migrated_engine)
            async with probe.transaction():
                for wallet_id, _ in wallets_[1:]:
                    # Raises LockNotAvailableError if the sweep had locked this higher wallet first.
                    await probe.execute(
                        "SELECT 1 FROM wallets WHERE id = $1 FOR NO KEY UPDATE NOWAIT", wallet_id
                    )
            assert not running.done()
        assert await asyncio.wait_for(running, timeout=10) == len(reqs)  # one hold per wallet
    for wallet_id, _ in wallets_:
        # Each charged its estimate and its reservation released.
        assert await money(migrated_engine, wallet_id) == (1_000_000 - 1_000, 0)
    assert await invariants(migrated_engine) == []
