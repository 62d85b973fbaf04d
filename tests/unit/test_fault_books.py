"""The books the fault tests and the chaos benchmark end with (bench/books.py), shown to catch
each way money can go wrong: every rule here fails on the discrepancy it names, so a fault test
that passes has really been checked."""

from __future__ import annotations

import pytest

from bench import books
from billing import pricing
from billing.usage import Usage

WALLET = "wal_a"
OTHER_WALLET = "wal_b"
BEFORE = 1_000_000


class Prices(books.Tariff):
    """Fixed amounts per shape (exact, hold), so each case reads as numbers."""

    def __init__(self, amounts: dict[str, tuple[int, int]]) -> None:
        super().__init__(pricing.PriceBook({}))
        self._amounts = amounts

    def exact_nano(self, shape: books.Shape, usage: Usage) -> int:
        return self._amounts[shape.name][0]

    def hold_nano(self, shape: books.Shape) -> int:
        return self._amounts[shape.name][1]

    def allowed_nano(self, shape: books.Shape) -> frozenset[int]:
        return frozenset(self._amounts[shape.name])


CHAT = books.SHAPES[0]
STREAM = books.SHAPES[1]
TARIFF = Prices({CHAT.name: (100, 300), STREAM.name: (300, 500)})
USAGE = Usage.tokens(prompt_tokens=1, completion_tokens=1)


def seen(
    request_id: str | None,
    status: int | None = 200,
    *,
    shape: books.Shape = CHAT,
    complete: bool = True,
    wallet: str = WALLET,
) -> books.Seen:
    one = books.Seen(shape, wallet, started_at=1.0, ended_at=2.0, status=status, request_id=request_id)
    one.finished = complete
    one.usage = USAGE if complete and status == 200 else None
    return one


def hold(state: str = "posted", amount: int = 300, wallet: str = WALLET) -> books.Hold:
    return books.Hold(wallet, amount, state, created_at=1.5, resolved_at=2.5 if state != "pending" else None)


def charge(amount: int, wallet: str = WALLET) -> books.Charge:
    return books.Charge(wallet, amount, "response", created_at=2.5)


def unreported(amount: int) -> books.Charge:
    """What billing/expiry.py charges a hold no log reported."""
    return books.Charge(WALLET, amount, "hold_estimate", created_at=20.0, unfinished=books.UNREPORTED)


def cut(amount: int, why: str = books.CUT_BEFORE_THE_ANSWER) -> books.Charge:
    """What the settlement charges an answer cut short (its hold)."""
    return books.Charge(WALLET, amount, "hold_estimate", created_at=2.5, unfinished=why)


def view(
    charges: dict[str, books.Charge], holds: dict[str, books.Hold], wallets: dict[str, int] | None = None
) -> books.LedgerView:
    wallets = wallets or {WALLET: BEFORE}
    balances = {
        w: (before - sum(c.amount_nano for c in charges.values() if c.wallet_id == w), 0)
        for w, before in wallets.items()
    }
    return books.LedgerView(charges, dict(wallets), holds, balances, [])


def judge(
    requests: list[books.Seen],
    ledger: books.LedgerView,
    arrivals: list[str],
    wallets: dict[str, int] | None = None,
    envoy_killed_at: tuple[float, ...] = (),
    envoy_stopped_at: tuple[float, ...] = (),
) -> books.Verdict:
    return books.compare(
        requests, ledger, TARIFF, wallets or {WALLET: BEFORE}, arrivals, envoy_killed_at, envoy_stopped_at
    )


def test_requests_each_charged_once_as_seen_are_exact() -> None:
    requests = [seen("r1"), seen("r2", shape=STREAM, complete=False), seen("r3", 429)]
    ledger = view(
        {"r1": charge(100), "r2": charge(500)},
        {"r1": hold(), "r2": hold(amount=500), "r3": hold("voided")},
    )
    verdict = judge(requests, ledger, ["r1", "r2"])
    assert verdict.problems == [] and verdict.exact
    assert (verdict.admitted, verdict.settled, verdict.charged, verdict.voided, verdict.served) == (
        3,
        3,
        2,
        1,
        2,
    )
    assert verdict.outcomes == {"complete": 1, "cut": 1, "refused": 1}


@pytest.mark.parametrize(
    ("requests", "charges", "holds", "arrivals", "problem"),
    [
        ([seen("r1")], {}, {"r1": hold("voided")}, ["r1"], "never charged"),
        ([seen("r1")], {"r1": charge(300)}, {"r1": hold()}, ["r1"], "charged 300 (response), expected 100"),
        ([seen("r1", 403)], {"r1": charge(100)}, {"r1": hold()}, [], "refused, yet charged"),
        ([seen("r1", 503)], {}, {"r1": hold("voided")}, ["r1"], "refused, yet the backend served it"),
        (
            [seen("r1", complete=False)],
            {},
            {"r1": hold("voided")},
            ["r1"],
            "never charged (expected [100, 300])",
        ),
        ([seen("r1", complete=False)], {"r1": charge(200)}, {"r1": hold()}, ["r1"], "expected 100 or 300"),
        ([seen("r1", 504)], {}, {"r1": hold("voided")}, ["r1"], "never charged"),
        ([seen("r1")], {"r1": charge(100)}, {"r1": hold("pending")}, ["r1"], "left pending"),
        ([seen("r1", 503)], {}, {"r1": hold("expired")}, [], "left expired"),
        ([seen("r1")], {"r1": charge(100)}, {"r1": hold(amount=299)}, ["r1"], "held 299"),
        (
            [seen("r1")],
            {"r1": charge(100, OTHER_WALLET)},
            {"r1": hold()},
            ["r1"],
            f"charged to {OTHER_WALLET}",
        ),
        ([seen("r1")], {"r1": charge(100)}, {"r1": hold()}, ["r1", "r1"], "saw request r1 2 times"),
        ([seen("r1")], {"r1": charge(100)}, {"r1": hold(), "r9": hold("voided")}, ["r1", "r9"], "r9 reached"),
        ([seen("r1"), seen("r1")], {"r1": charge(100)}, {"r1": hold()}, ["r1"], "two answers carry"),
        ([seen("r1")], {"r1": charge(100)}, {}, ["r1"], "usage entry r1 has no hold"),
        ([seen("r1")], {"r1": charge(100)}, {"r1": hold("voided")}, ["r1"], "voided but has usage entry"),
    ],
)
def test_each_discrepancy_is_named(requests, charges, holds, arrivals, problem) -> None:
    verdict = judge(requests, view(charges, holds), arrivals)
    assert not verdict.exact
    assert any(problem in p for p in verdict.problems), verdict.problems


def test_a_balance_that_moved_by_other_than_its_charges_is_named() -> None:
    ledger = view({"r1": charge(100)}, {"r1": hold()})
    moved = books.LedgerView(
        ledger.charges, ledger.other_entries, ledger.holds, {WALLET: (BEFORE - 101, 0)}, []
    )
    problems = judge([seen("r1")], moved, ["r1"]).problems
    assert problems == [
        f"wallet {WALLET}: balance {BEFORE - 101}, expected {BEFORE} - 100 charged = {BEFORE - 100}"
    ]


def test_money_still_reserved_and_audit_findings_are_named() -> None:
    ledger = view({"r1": charge(100)}, {"r1": hold()})
    broken = books.LedgerView(
        ledger.charges, ledger.other_entries, ledger.holds, {WALLET: (BEFORE - 100, 7)}, ["wal_a: reserved 7"]
    )
    problems = judge([seen("r1")], broken, ["r1"]).problems
    assert problems == [f"wallet {WALLET}: 7 still reserved", "audit: wal_a: reserved 7"]


def test_charges_of_requests_the_clients_never_saw_answered_are_matched_to_lost_ones() -> None:
    """Lost requests (no status, no id): each may account for one charge on its wallet of one of
    its two amounts. The matching finds an assignment where a greedy one would not: the first
    charge (300) fits both lost requests, the second (100) only the chat one."""
    lost_chat, lost_stream = seen(None, None, complete=False), seen(None, None, shape=STREAM, complete=False)
    charges = {"x1": charge(300), "x2": charge(100)}
    holds = {"x1": hold(), "x2": hold()}
    verdict = judge([lost_chat, lost_stream], view(charges, holds), ["x1", "x2"])
    assert verdict.problems == []
    assert verdict.outcomes == {"lost": 2}


@pytest.mark.parametrize(
    ("charges", "wallet"),
    [
        ({"x1": charge(100), "x2": charge(100)}, WALLET),  # two charges, one lost request
        ({"x1": charge(200)}, WALLET),  # an amount it could not be charged
        ({"x1": charge(100, OTHER_WALLET)}, OTHER_WALLET),  # another wallet's
    ],
)
def test_a_charge_no_lost_request_accounts_for_is_named(charges, wallet) -> None:
    holds = {rid: hold(wallet=c.wallet_id) for rid, c in charges.items()}
    wallets = {WALLET: BEFORE, OTHER_WALLET: BEFORE}
    verdict = judge([seen(None, None, complete=False)], view(charges, holds, wallets), list(charges), wallets)
    assert any("no request the clients sent accounts for it" in p for p in verdict.problems), verdict.problems


def test_the_differences_the_chaos_run_prints_count_what_must_be_zero() -> None:
    ledger = view({"r1": charge(100), "r2": charge(300)}, {"r1": hold(), "r2": hold(), "r3": hold("pending")})
    verdict = judge([seen("r1"), seen(None, None, complete=False), seen("r3", 503)], ledger, ["r1", "r4"])
    assert verdict.differences == {
        "admitted - settled": 1,
        "settled - (charged + voided)": 0,
        "served, not charged": 1,
        "charged, not served": 1,
        "problems": len(verdict.problems),
    }
    assert "differences (each must be 0): admitted - settled = 1" in books.render(verdict)


ENDED_AT = 2.0  # seen()'s


@pytest.mark.parametrize(
    ("killed_at", "charged", "exact"),
    [
        (ENDED_AT + books.REPORTS_LOST_S, unreported(300), True),  # its reports died with Envoy
        (ENDED_AT - 0.05, unreported(300), True),  # the client read its end just after the kill
        (ENDED_AT + books.REPORTS_LOST_S + 0.01, unreported(300), False),  # ended well before it
        (ENDED_AT, books.Charge(WALLET, 300, "hold_estimate", created_at=2.5), False),  # reported unfinished
        (ENDED_AT, unreported(299), False),  # not its hold
        (None, unreported(300), False),  # Envoy was never killed
    ],
)
def test_a_complete_request_may_be_charged_its_hold_only_when_a_killed_envoy_took_its_reports(
    killed_at, charged, exact
) -> None:
    verdict = judge(
        [seen("r1")],
        view({"r1": charged}, {"r1": hold()}),
        ["r1"],
        envoy_killed_at=() if killed_at is None else (killed_at,),
    )
    assert verdict.exact is exact, verdict.problems
    assert verdict.estimated_after_envoy_kill == (1 if exact else 0)


KILLED_IN_FLIGHT = 1.8  # seen() runs from 1.0 to 2.0, hold() is placed at 1.5


def unserved(
    charged: books.Charge,
    killed_at: tuple[float, ...],
    *,
    hold_wallet: str = WALLET,
    held: int = 300,
    held_at: float = 1.5,
    stopped_at: tuple[float, ...] = (),
) -> books.Verdict:
    """A lost request on WALLET, and a charge of a request the backend never saw."""
    wallets = {WALLET: BEFORE, OTHER_WALLET: BEFORE}
    placed = books.Hold(hold_wallet, held, "posted", created_at=held_at, resolved_at=20.0)
    ledger = view({"x1": charged}, {"x1": placed}, wallets)
    return judge(
        [seen(None, None, complete=False)],
        ledger,
        [],
        wallets,
        envoy_killed_at=killed_at,
        envoy_stopped_at=stopped_at,
    )


def test_a_request_charged_its_estimate_in_flight_at_an_envoy_kill_is_the_one_exception() -> None:
    """Envoy died between a request's Check and the backend: no log reports it, so its hold is
    charged its estimate (billing/expiry.py) though nothing was served. Exact, and counted."""
    verdict = unserved(unreported(300), (KILLED_IN_FLIGHT,))
    assert verdict.exact, verdict.problems
    assert (verdict.charged_not_served, verdict.unserved_estimated_after_envoy_kill) == (0, 1)
    assert "in flight, never served 1" in books.render(verdict)


@pytest.mark.parametrize(
    ("charged", "killed_at", "hold_wallet", "held", "held_at"),
    [
        (unreported(300), (), WALLET, 300, 1.5),  # Envoy was never killed
        (charge(300), (KILLED_IN_FLIGHT,), WALLET, 300, 1.5),  # a report said it was served
        (unreported(300), (0.8,), WALLET, 300, 1.5),  # killed before the request was sent
        (unreported(300), (1.4,), WALLET, 300, 2.5),  # held too long after the kill for its Check
        (unreported(300), (2.1,), WALLET, 300, 1.5),  # killed after the only request had ended
        (unreported(300), (KILLED_IN_FLIGHT,), WALLET, 300, 0.5),  # held before that request began
        (
            books.Charge(OTHER_WALLET, 300, "hold_estimate", 20.0, books.UNREPORTED),
            (KILLED_IN_FLIGHT,),
            OTHER_WALLET,
            300,
            1.5,
        ),  # no request of its wallet in flight
        (unreported(100), (KILLED_IN_FLIGHT,), WALLET, 300, 1.5),  # not its hold's amount
    ],
    ids=[
        "no-kill",
        "reported",
        "killed-before",
        "held-long-after",
        "killed-after",
        "held-before-the-request",
        "no-request-in-flight",
        "not-the-hold",
    ],
)
def test_any_other_charge_of_a_request_never_served_is_a_difference(
    charged: books.Charge, killed_at: tuple[float, ...], hold_wallet: str, held: int, held_at: float
) -> None:
    verdict = unserved(charged, killed_at, hold_wallet=hold_wallet, held=held, held_at=held_at)
    assert verdict.charged_not_served == 1
    assert verdict.unserved_estimated_after_envoy_kill == 0
    assert verdict.differences["charged, not served"] == 1 and not verdict.exact
    assert "charged, not served = 1" in books.render(verdict)
    assert "charged, not served: request x1 charged" in books.render(verdict)


def test_a_check_sent_before_the_kill_may_place_its_hold_just_after() -> None:
    """The sidecar does not know Envoy died: a Check it received just before places its hold a
    moment after the kill, and no log ever reports that request."""
    verdict = unserved(unreported(300), (1.4,), held_at=1.4 + books.CHECK_AFTER_KILL_S)
    assert verdict.exact, verdict.problems
    assert verdict.unserved_estimated_after_envoy_kill == 1


@pytest.mark.parametrize("charged", [unreported(300), cut(300)], ids=["unreported", "cut-before-the-answer"])
def test_a_graceful_stop_of_envoy_explains_the_holds_of_requests_it_cut_before_the_backend(
    charged: books.Charge,
) -> None:
    """A graceful stop (SIGTERM, no drain) cuts the requests in flight: one still at its Check is
    never reported, one Envoy was connecting to the backend is reported as cut before its answer.
    Either is charged its hold though nothing was served; exact, and counted apart."""
    verdict = unserved(charged, (), stopped_at=(KILLED_IN_FLIGHT,))
    assert verdict.exact, verdict.problems
    assert (verdict.charged_not_served, verdict.unserved_estimated_after_envoy_kill) == (0, 1)


@pytest.mark.parametrize(
    ("charged", "stopped_at"),
    [
        (cut(300), ()),  # Envoy was never stopped
        (cut(300, "upstream_timeout"), (KILLED_IN_FLIGHT,)),  # a timeout: the backend had it
        (cut(300), (2.1,)),  # stopped after the only request had ended
        (cut(100), (KILLED_IN_FLIGHT,)),  # not its hold's amount
    ],
    ids=["no-stop", "timeout", "stopped-after", "not-the-hold"],
)
def test_any_other_cut_charge_of_a_request_never_served_is_a_difference(
    charged: books.Charge, stopped_at: tuple[float, ...]
) -> None:
    verdict = unserved(charged, (), stopped_at=stopped_at)
    assert verdict.charged_not_served == 1 and not verdict.exact
