"""billing.alerts' pure rules: which addresses and URLs the gateway posts to, which thresholds it
takes, and a signature that Stripe's own verifier accepts (the scheme is Stripe's on purpose)."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
import stripe

from billing import alerts, money


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("93.184.215.14", True),
        ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", True),
        ("127.0.0.1", False),
        ("127.1.2.3", False),
        ("0.0.0.0", False),
        ("10.1.2.3", False),
        ("172.31.255.255", False),
        ("192.168.0.1", False),
        ("100.64.0.1", False),
        ("169.254.169.254", False),
        ("224.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1%eth0", False),
        ("fd12:3456::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("not an address", False),
    ],
)
def test_only_public_unicast_addresses_are_allowed(address: str, allowed: bool) -> None:
    assert alerts.address_allowed(address, allow_private=False) is allowed
    assert alerts.address_allowed(address, allow_private=True)


def test_the_setting_allows_http_and_private_addresses_only_when_on() -> None:
    for url in ("http://127.0.0.1:8000/hook", "https://10.0.0.1/hook"):
        with pytest.raises(alerts.InvalidUrl):
            alerts.check_url(url, allow_private=False)
        assert alerts.check_url(url, allow_private=True) == url
    assert alerts.check_url("https://hooks.example.com/a?b=c", allow_private=False)
    with pytest.raises(alerts.InvalidUrl):
        alerts.check_url("ftp://hooks.example.com/", allow_private=True)


def test_thresholds_are_exact_sorted_and_bounded() -> None:
    assert alerts.check_thresholds(["5", "0", "0.000000001", "5.00"]) == [0, 1, 5 * money.NANO_PER_USD]
    for bad in ([], ["1"] * 6, [1], ["-1"], ["1e3"], ["NaN"], "5", None):
        with pytest.raises(ValueError):
            alerts.check_thresholds(bad)


def test_stripes_verifier_accepts_the_signature() -> None:
    delivery = alerts.Delivery(
        event_id=alerts.new_event_id(),
        wallet_id="wal_x",
        type=alerts.EventType.BALANCE_LOW,
        threshold_nano=money.NANO_PER_USD,
        balance_nano=999_999_999,
        created_at=dt.datetime.now(dt.UTC),
        attempt=1,
        url="https://hooks.example.com/",
        signing_secret=alerts.new_signing_secret(),
    )
    body = delivery.payload()
    assert json.loads(body)["data"] == {
        "wallet_id": "wal_x",
        "threshold_usd": "1.000000",
        "balance_usd": "0.999999999",
    }
    header = alerts.signature(body, delivery.signing_secret, int(time.time()))
    assert stripe.WebhookSignature.verify_header(
        body.decode(), header, delivery.signing_secret, tolerance=300
    )
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(
            body.decode() + " ", header, delivery.signing_secret, tolerance=300
        )
    stale = alerts.signature(body, delivery.signing_secret, int(time.time()) - 3600)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(body.decode(), stale, delivery.signing_secret, tolerance=300)
