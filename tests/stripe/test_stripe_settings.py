"""The Stripe settings: read from STRIPE_* and BILLINGPROXY_TOPUP_*, refused with a named error when
they could lose money (a key without its webhook secret) or point a live key at a double."""

from __future__ import annotations

import pytest

from billing import settings

P = "BILLINGPROXY_"


def test_stripe_is_off_by_default_with_five_to_five_hundred_dollar_top_ups() -> None:
    s = settings.from_env({})
    assert not s.stripe_configured
    assert (s.stripe_secret_key, s.stripe_webhook_secret, s.stripe_api_base) == ("", "", "")
    assert (s.topup_nano_min, s.topup_nano_max) == (5 * 10**9, 500 * 10**9)


def test_stripe_values_are_read_and_secrets_stay_out_of_repr() -> None:
    s = settings.from_env(
        {
            "STRIPE_SECRET_KEY": " sk_test_abc ",
            "STRIPE_WEBHOOK_SECRET": "whsec_def",
            "STRIPE_API_BASE": "http://127.0.0.1:12111/",
            P + "TOPUP_USD_MIN": "1.50",
            P + "TOPUP_USD_MAX": "1000",
        }
    )
    assert s.stripe_configured
    assert (s.stripe_secret_key, s.stripe_webhook_secret, s.stripe_api_base) == (
        "sk_test_abc",
        "whsec_def",
        "http://127.0.0.1:12111",
    )
    assert (s.topup_nano_min, s.topup_nano_max) == (1_500_000_000, 1000 * 10**9)
    assert "sk_test_abc" not in repr(s) and "whsec_def" not in repr(s)


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"STRIPE_SECRET_KEY": "sk_test_a"}, "STRIPE_WEBHOOK_SECRET"),
        ({"STRIPE_WEBHOOK_SECRET": "whsec_a"}, "STRIPE_SECRET_KEY"),
        (
            {
                "STRIPE_SECRET_KEY": "sk_live_a",
                "STRIPE_WEBHOOK_SECRET": "whsec_a",
                "STRIPE_API_BASE": "http://127.0.0.1:1",
            },
            "live key",
        ),
        ({"STRIPE_API_BASE": "127.0.0.1:12111"}, "STRIPE_API_BASE"),
        ({"STRIPE_API_BASE": "http://127.0.0.1:1/v1"}, "STRIPE_API_BASE"),
        ({P + "TOPUP_USD_MIN": "0.49"}, P + "TOPUP_USD_MIN"),
        ({P + "TOPUP_USD_MIN": "5.001"}, P + "TOPUP_USD_MIN"),
        ({P + "TOPUP_USD_MIN": "five"}, P + "TOPUP_USD_MIN"),
        ({P + "TOPUP_USD_MAX": "1000000"}, P + "TOPUP_USD_MAX"),
        ({P + "TOPUP_USD_MAX": "-5"}, P + "TOPUP_USD_MAX"),
        ({P + "TOPUP_USD_MIN": "20", P + "TOPUP_USD_MAX": "10"}, P + "TOPUP_USD_MIN"),
    ],
)
def test_bad_stripe_settings_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(settings.SettingsError, match=names):
        settings.from_env(env)
