"""The signup limiter (authz_sidecar/http_api.py), its client address, and their settings, with
the clock passed in: per-client and gateway-wide windows, what a refusal counts, memory bounds."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from authz_sidecar import envoy_config, http_api
from billing import settings as settings_mod

Limiter = http_api.SignupLimiter


def test_a_client_gets_its_budget_per_minute_then_waits_for_the_oldest_to_expire() -> None:
    limiter = Limiter(per_client=2, per_gateway=100)
    assert limiter.admit("a", now=0.0) is None
    assert limiter.admit("a", now=10.0) is None
    assert limiter.admit("a", now=20.0) == http_api.SignupRefusal("client", 40)
    assert limiter.admit("b", now=20.0) is None  # another client, its own budget
    assert limiter.admit("a", now=59.5) == http_api.SignupRefusal("client", 1)
    assert limiter.admit("a", now=60.0) is None  # the first has left the window


def test_the_gateway_window_bounds_every_client_together() -> None:
    limiter = Limiter(per_client=5, per_gateway=3)
    for n in range(3):
        assert limiter.admit(f"10.0.0.{n}", now=float(n)) is None
    assert limiter.admit("10.0.0.99", now=5.0) == http_api.SignupRefusal("gateway", 55)
    assert limiter.admit("10.0.0.99", now=60.0) is None


def test_a_refused_attempt_counts_in_neither_window() -> None:
    """A flood from one address spends only its own budget, never the gateway's."""
    limiter = Limiter(per_client=1, per_gateway=3)
    assert limiter.admit("flood", now=0.0) is None
    for t in range(1, 50):
        assert limiter.admit("flood", now=float(t)).scope == "client"
    assert limiter.admit("x", now=50.0) is None and limiter.admit("y", now=50.0) is None
    # Refused by the gateway window: the client's own budget stays unspent.
    limiter = Limiter(per_client=1, per_gateway=1)
    assert limiter.admit("a", now=0.0) is None
    assert limiter.admit("b", now=1.0).scope == "gateway"
    assert limiter.admit("b", now=61.0) is None


def test_memory_stays_bounded_by_the_gateway_window() -> None:
    limiter = Limiter(per_client=1, per_gateway=10)
    for n in range(10_000):
        limiter.admit(f"client-{n}", now=float(n * 7))  # ~8 admitted per minute, all distinct
    assert len(limiter._clients) <= 2 * 10 + 16


def request(headers: dict[str, str], remote: str = "127.0.0.1"):
    req = make_mocked_request("POST", "/user/signup", headers=headers)
    return req.clone(remote=remote)


@pytest.mark.parametrize(
    ("headers", "remote", "client"),
    [
        (
            {"x-envoy-external-address": "203.0.113.7", "x-forwarded-for": "1.2.3.4, 127.0.0.1"},
            "127.0.0.1",
            "203.0.113.7",
        ),
        ({}, "127.0.0.5", "127.0.0.5"),  # no Envoy in between: the peer
        ({"x-forwarded-for": "1.2.3.4"}, "127.0.0.5", "127.0.0.5"),  # never X-Forwarded-For itself
        ({"x-envoy-external-address": "2001:db8:1:2:3:4:5:6"}, "127.0.0.1", "2001:db8:1:2::/64"),
        ({"x-envoy-external-address": "2001:db8:1:2:ffff::9"}, "127.0.0.1", "2001:db8:1:2::/64"),
        ({"x-envoy-external-address": "::ffff:198.51.100.4"}, "127.0.0.1", "198.51.100.4"),
        ({"x-envoy-external-address": "not-an-address"}, "127.0.0.1", "not-an-address"),
    ],
)
def test_the_client_address_is_envoys_trusted_address(
    headers: dict[str, str], remote: str, client: str
) -> None:
    assert http_api.client_address(request(headers, remote)) == client


def test_the_settings_and_envoys_trusted_hops() -> None:
    defaults = settings_mod.Settings()
    assert (defaults.signup_rate_global_per_minute, defaults.trusted_proxy_hops) == (60, 0)
    s = settings_mod.from_env(
        {"BILLINGPROXY_SIGNUP_RATE_GLOBAL_PER_MINUTE": "30", "BILLINGPROXY_TRUSTED_PROXY_HOPS": "2"}
    )
    assert (s.signup_rate_global_per_minute, s.trusted_proxy_hops) == (30, 2)
    for name, bad in (
        ("SIGNUP_RATE_GLOBAL_PER_MINUTE", "0"),
        ("TRUSTED_PROXY_HOPS", "-1"),
        ("TRUSTED_PROXY_HOPS", "11"),
        ("TRUSTED_PROXY_HOPS", "one"),
    ):
        with pytest.raises(settings_mod.SettingsError, match=f"BILLINGPROXY_{name}"):
            settings_mod.from_env({f"BILLINGPROXY_{name}": bad})

    def hcm(settings: settings_mod.Settings) -> dict:
        settings = settings.replace(access_log_secret="s" * 32)  # rendering needs one
        listener = envoy_config.render(settings, backend_url="http://127.0.0.1:4000")["static_resources"][
            "listeners"
        ][0]
        return listener["filter_chains"][0]["filters"][0]["typed_config"]

    assert hcm(defaults)["use_remote_address"] is True
    assert hcm(defaults)["xff_num_trusted_hops"] == 0
    assert hcm(s)["xff_num_trusted_hops"] == 2
