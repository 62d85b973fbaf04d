"""authz_sidecar.access_log.finished_request_from_json: what `billingproxy reconcile` reads from
a line of Envoy's JSON access log, and what it refuses to guess."""

from __future__ import annotations

import pytest

from authz_sidecar.access_log import FinishedRequest, finished_request_from_json
from billing import pricing
from billing.usage import Usage

HOLD = {"x-billingproxy-hold-id": "r1", "x-billingproxy-wallet-id": "wal_1",
        "x-billingproxy-key-id": "key_1", "x-billingproxy-model": "gemini%2Fgemini-2.5-flash"}


def line(**changes):
    base = {"request_id": "r1", "status": 200, "authz": dict(HOLD),
            "usage": {"prompt_tokens": 7, "completion_tokens": 5, "cached_tokens": 9, "usage_seen": True}}
    return {**base, **changes}


def test_a_billed_request_with_its_usage() -> None:
    assert finished_request_from_json(line()) == FinishedRequest(
        request_id="r1", status=200, model="gemini/gemini-2.5-flash",
        usage=Usage.tokens(prompt_tokens=7, completion_tokens=5, cached_tokens=7),  # cached ≤ prompt
        wallet_id="wal_1",
    )


def test_usage_not_seen_leaves_the_hold_estimate_to_the_settler() -> None:
    done = finished_request_from_json(line(usage={"prompt_tokens": 0, "usage_seen": False}))
    assert done is not None and done.usage is None


def test_a_check_envoy_gave_up_on_is_voided_by_request_id() -> None:
    assert finished_request_from_json(line(status=503, authz=None)) == FinishedRequest("r1", 503, "", None)


@pytest.mark.parametrize("record", [
    line(authz=None),                      # a sidecar route or a denial: no hold
    line(authz={"ext_authz_duration": 1}),  # a Check without a hold (GET /v1/models)
    line(status="200"),                    # not Envoy's shape
    line(status=True),
    {"time": "2026-11-25T11:41:10Z"},
], ids=["no-authz", "no-hold", "status-text", "status-bool", "other"])
def test_lines_with_nothing_to_settle(record) -> None:
    assert finished_request_from_json(record) is None


def test_unreadable_counts_are_not_guessed() -> None:
    done = finished_request_from_json(line(usage={"prompt_tokens": "many", "usage_seen": True}))
    assert done is not None and done.usage is None
