"""billing.wallets.WalletState: one state per wallet, whichever of its conditions apply, and the
same order the Check refuses in."""

from __future__ import annotations

import datetime as dt
import itertools
from importlib import resources

import pytest
import yaml

from billing import holds, wallets

State = wallets.WalletState
# Written out here rather than taken from the module, so a change of the precedence fails a test.
EXPECTED = {
    # (suspended, disputed, empty) → state
    (False, False, False): State.ACTIVE,
    (False, False, True): State.EMPTY,
    (False, True, False): State.DISPUTED,
    (False, True, True): State.DISPUTED,
    (True, False, False): State.SUSPENDED,
    (True, False, True): State.SUSPENDED,
    (True, True, False): State.SUSPENDED,
    (True, True, True): State.SUSPENDED,
}
# What a request costing 1 nano-USD is refused with, in each state (None: admitted).
REFUSAL = {
    State.ACTIVE: None,
    State.EMPTY: holds.RefusalReason.INSUFFICIENT_FUNDS,
    State.DISPUTED: holds.RefusalReason.PAYMENT_DISPUTED,
    State.SUSPENDED: holds.RefusalReason.WALLET_SUSPENDED,
}


def wallet(*, suspended: bool, disputed: bool, balance_nano: int, limit_nano: int = 0) -> wallets.Wallet:
    return wallets.Wallet(
        id="wal_x",
        email=None,
        source="admin",
        external_id=None,
        balance_nano=balance_nano,
        reserved_nano=0,
        suspended=suspended,
        disputed=disputed,
        created_at=dt.datetime.now(dt.UTC),
        overdraft_limit_nano=limit_nano,
    )


@pytest.mark.parametrize(("suspended", "disputed", "empty"), list(itertools.product([False, True], repeat=3)))
def test_every_combination_has_one_state_by_precedence(suspended: bool, disputed: bool, empty: bool) -> None:
    w = wallet(suspended=suspended, disputed=disputed, balance_nano=0 if empty else 1)
    assert w.state is EXPECTED[(suspended, disputed, empty)]


@pytest.mark.parametrize(("suspended", "disputed", "empty"), list(itertools.product([False, True], repeat=3)))
def test_the_state_names_the_refusal_a_request_would_get(
    suspended: bool, disputed: bool, empty: bool
) -> None:
    w = wallet(suspended=suspended, disputed=disputed, balance_nano=0 if empty else 1)
    refusal = holds.refusal_of(
        balance_nano=w.balance_nano,
        reserved_nano=w.reserved_nano,
        overdraft_limit_nano=w.overdraft_limit_nano,
        amount_nano=1,
        suspended=w.suspended,
        disputed=w.disputed,
    )
    assert (None if refusal is None else refusal.reason) is REFUSAL[w.state]
    if w.state is State.EMPTY:
        assert refusal is not None and refusal.shortfall is holds.Shortfall.WALLET_EMPTY


def test_empty_counts_the_overdraft_limit_except_in_strict_mode() -> None:
    overdrawn = wallet(suspended=False, disputed=False, balance_nano=-5, limit_nano=6)
    assert overdrawn.state_in(strict=False) is State.ACTIVE
    assert overdrawn.state_in(strict=True) is State.EMPTY
    assert wallet(suspended=False, disputed=False, balance_nano=-6, limit_nano=6).state is State.EMPTY


def test_the_api_documents_every_state_as_it_renders_it() -> None:
    document = yaml.safe_load((resources.files("authz_sidecar") / "openapi.yaml").read_text())
    documented = document["components"]["schemas"]["Balance"]["properties"]["state"]["enum"]
    assert documented == [state.value for state in State] == ["active", "empty", "suspended", "disputed"]
