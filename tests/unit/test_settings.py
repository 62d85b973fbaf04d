"""billing.settings: defaults, parsing, and a named error for every bad value."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from authz_sidecar import access_log, check
from billing import settings

P = "BILLINGPROXY_"


def test_defaults() -> None:
    s = settings.from_env({})
    assert s == settings.Settings()
    assert s.database_url == ""
    assert s.data_dir == Path(".data")
    assert s.free_grant_nano == 500_000_000  # $0.50
    assert s.admission == "overdraft" and not s.strict
    assert s.overdraft_limit_nano == 1_000_000_000  # $1.00, for wallets other than self-service ones
    assert s.hold_ttl_s == 600
    assert s.upstream_timeout_s == 300
    assert s.price_overrides_path is None
    assert s.markup_percent == Decimal(0)
    assert s.backend_url == "" and s.backend_api_key == ""
    assert s.bind_host == "127.0.0.1"
    assert (s.gateway_port, s.api_port, s.grpc_port, s.admin_port) == (8080, 8081, 9001, 9090)
    assert s.public_url == "http://127.0.0.1:8080"
    assert s.request_body_bytes_max == 4 * 1024 * 1024
    assert s.key_cache_ttl_ms == 500
    assert s.signup_rate_per_minute == 5
    assert s.usage_page_size_max == 100


def test_empty_values_mean_defaults() -> None:
    names = [
        "FREE_GRANT_USD",
        "MARKUP_PERCENT",
        "PRICE_OVERRIDES",
        "GATEWAY_PORT",
        "ADMISSION",
        "HOLD_TTL_S",
        "BACKEND_URL",
        "PUBLIC_URL",
        "BIND_HOST",
        "OVERDRAFT_LIMIT_USD",
    ]
    assert settings.from_env({P + name: "" for name in names}) == settings.Settings()


def test_values_are_read(tmp_path: Path) -> None:
    overrides = tmp_path / "prices.yaml"
    overrides.write_text("models: {}\n", encoding="utf-8")
    s = settings.from_env(
        {
            "DATABASE_URL": "postgresql://u:p@db:5432/billing",
            P + "DATA_DIR": str(tmp_path),
            P + "FREE_GRANT_USD": "1.25",
            P + "ADMISSION": " Strict ",
            P + "OVERDRAFT_LIMIT_USD": "2.5",
            P + "HOLD_TTL_S": "120",
            P + "UPSTREAM_TIMEOUT_S": "119",
            P + "CHECK_TIMEOUT_MS": "500",
            P + "PRICE_OVERRIDES": str(overrides),
            P + "MARKUP_PERCENT": "12.5",
            P + "BACKEND_URL": "https://llm.example.com:4000/",
            P + "BACKEND_API_KEY": "sk-backend",
            P + "BIND_HOST": "0.0.0.0",
            P + "GATEWAY_PORT": "18080",
            P + "API_PORT": "18081",
            P + "GRPC_PORT": "19001",
            P + "ADMIN_PORT": "19090",
            P + "KEY_CACHE_TTL_MS": "0",
            P + "SIGNUP_RATE_PER_MINUTE": "60",
            P + "USAGE_PAGE_SIZE_MAX": "1000",
            P + "REQUEST_BODY_BYTES_MAX": "1024",
        }
    )
    assert s.database_url == "postgresql://u:p@db:5432/billing"
    assert s.data_dir == tmp_path
    assert s.free_grant_nano == 1_250_000_000
    assert s.admission == "strict" and s.strict
    assert s.overdraft_limit_nano == 2_500_000_000
    assert (s.hold_ttl_s, s.upstream_timeout_s, s.check_timeout_ms) == (120, 119, 500)
    assert s.price_overrides_path == overrides
    assert s.markup_percent == Decimal("12.5") and type(s.markup_percent) is Decimal
    assert s.backend_url == "https://llm.example.com:4000"  # trailing slash dropped
    assert s.backend_api_key == "sk-backend"
    assert s.bind_host == "0.0.0.0"
    assert (s.gateway_port, s.api_port, s.grpc_port, s.admin_port) == (18080, 18081, 19001, 19090)
    # Bound to every address, links still need one a client can reach.
    assert s.public_url == "http://127.0.0.1:18080"
    assert (s.key_cache_ttl_ms, s.signup_rate_per_minute, s.usage_page_size_max) == (0, 60, 1000)
    assert s.request_body_bytes_max == 1024


def test_public_url_follows_bind_host_and_can_be_set() -> None:
    assert settings.from_env({P + "BIND_HOST": "10.0.0.5"}).public_url == "http://10.0.0.5:8080"
    s = settings.from_env({P + "PUBLIC_URL": "https://billing.example.com/"})
    assert s.public_url == "https://billing.example.com"


def test_free_grant_can_be_zero() -> None:
    assert settings.from_env({P + "FREE_GRANT_USD": "0"}).free_grant_nano == 0


def test_overdraft_limit_can_be_zero_and_at_most_the_crds_largest() -> None:
    assert settings.from_env({P + "OVERDRAFT_LIMIT_USD": "0"}).overdraft_limit_nano == 0
    largest = settings.from_env({P + "OVERDRAFT_LIMIT_USD": "9999999.999999999"})
    assert largest.overdraft_limit_nano == settings.OVERDRAFT_LIMIT_NANO_MAX


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(P + "GATEWAY_PORT", "18443")
    monkeypatch.setenv(P + "FREE_GRANT_USD", "2")
    s = settings.from_env()
    assert s.gateway_port == 18443
    assert s.free_grant_nano == 2_000_000_000


BAD_VALUES = [
    ("GATEWAY_PORT", "0"),
    ("GATEWAY_PORT", "65536"),
    ("GATEWAY_PORT", "http"),
    ("API_PORT", "-1"),
    ("GRPC_PORT", "9001.5"),
    ("ADMIN_PORT", "9e3"),
    ("ACCESS_LOG_SECRET", "too-short"),
    ("BACKEND_AUTH_HEADER", "api-key"),
    ("UPSTREAM_HEADERS", "x-*"),
    ("ADMISSION", "lenient"),
    ("CHECK_TRANSPORT", "grpc-web"),
    ("CHECK_PORT", "0"),
    ("BACKEND_API_KEY", "sk live"),
    ("BACKEND_API_KEY", "sk-\nx-injected: 1"),
    ("ADMISSION", "strict-ish"),
    ("FREE_GRANT_USD", "-1"),
    ("FREE_GRANT_USD", "abc"),
    ("FREE_GRANT_USD", "1e3"),
    ("FREE_GRANT_USD", "0.0000000001"),
    ("FREE_GRANT_USD", "0.5 USD"),
    ("OVERDRAFT_LIMIT_USD", "-1"),
    ("OVERDRAFT_LIMIT_USD", "1e3"),
    ("OVERDRAFT_LIMIT_USD", "0.0000000001"),
    ("OVERDRAFT_LIMIT_USD", "10000000"),
    ("MARKUP_PERCENT", "-5"),
    ("MARKUP_PERCENT", "abc"),
    ("MARKUP_PERCENT", "NaN"),
    ("MARKUP_PERCENT", "Infinity"),
    ("MARKUP_PERCENT", "20%"),
    ("HOLD_TTL_S", "5"),
    ("HOLD_TTL_S", "ten"),
    ("KEY_CACHE_TTL_MS", "5000"),
    ("USAGE_PAGE_SIZE_MAX", "0"),
    ("REQUEST_BODY_BYTES_MAX", "10"),
    ("SIGNUP_RATE_PER_MINUTE", "0"),
    ("UPSTREAM_TIMEOUT_S", "0"),
    ("UPSTREAM_TIMEOUT_S", "600"),  # == HOLD_TTL_S's default: the hold could die with the request
    ("UPSTREAM_TIMEOUT_S", "601"),
    ("BACKEND_URL", "ftp://llm.example.com"),
    ("BACKEND_URL", "llm.example.com:4000"),
    ("BACKEND_URL", "http://"),
    ("BACKEND_URL", "http://exa mple.com"),
    ("PUBLIC_URL", "billing.example.com"),
    ("PRICE_OVERRIDES", "/nonexistent/prices.yaml"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_bad_value_names_its_variable(name: str, value: str) -> None:
    with pytest.raises(settings.SettingsError) as caught:
        settings.from_env({P + name: value})
    assert P + name in str(caught.value)


# Written out here rather than taken from the module, so dropping a rename from it fails a test.
RENAMED = [
    ("HTTP_PORT", "API_PORT", "8081"),
    ("REQUEST_BODY_MAX_BYTES", "REQUEST_BODY_BYTES_MAX", "1024"),
    ("TOPUP_MIN_USD", "TOPUP_USD_MIN", "5"),
    ("TOPUP_MAX_USD", "TOPUP_USD_MAX", "500"),
]


@pytest.mark.parametrize(("old", "new", "value"), RENAMED)
def test_a_renamed_variable_still_set_stops_start_up_naming_the_new_one(
    old: str, new: str, value: str
) -> None:
    """Even with a value that was valid and the new name set too: an ignored setting is a surprise."""
    for env in ({P + old: value}, {P + old: value, P + new: value}, {P + old: ""}):
        with pytest.raises(settings.SettingsError) as caught:
            settings.from_env(env)
        assert P + old in str(caught.value) and P + new in str(caught.value)
    settings.from_env({P + new: value})


def test_price_overrides_naming_a_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(settings.SettingsError, match=P + "PRICE_OVERRIDES"):
        settings.from_env({P + "PRICE_OVERRIDES": str(tmp_path)})


def test_hold_ttl_below_the_upstream_timeout_names_both() -> None:
    with pytest.raises(settings.SettingsError) as caught:
        settings.from_env({P + "HOLD_TTL_S": "60"})  # the default upstream timeout is 300
    assert P + "UPSTREAM_TIMEOUT_S" in str(caught.value)
    assert P + "HOLD_TTL_S" in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"admission": "bogus"}, "ADMISSION"),
        ({"upstream_timeout_s": 600}, "UPSTREAM_TIMEOUT_S"),
        ({"upstream_timeout_s": 598, "check_timeout_ms": 3000}, "CHECK_TIMEOUT_MS"),
        ({"free_grant_nano": -1}, "FREE_GRANT_USD"),
        ({"overdraft_limit_nano": -1}, "OVERDRAFT_LIMIT_USD"),
        ({"markup_percent": Decimal("-0.5")}, "MARKUP_PERCENT"),
        ({"backend_url": "gopher://x"}, "BACKEND_URL"),
        ({"public_url": "/relative"}, "PUBLIC_URL"),
        ({"check_transport": "tcp"}, "CHECK_TRANSPORT"),
        ({"backend_api_key": "ключ"}, "BACKEND_API_KEY"),
    ],
)
def test_settings_objects_check_themselves(changes: dict[str, object], name: str) -> None:
    with pytest.raises(settings.SettingsError, match=P + name):
        settings.Settings(**changes)
    with pytest.raises(settings.SettingsError, match=P + name):
        settings.Settings().replace(**changes)


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(settings.SettingsError, ValueError)


def test_the_check_transport_is_http_unless_grpc_is_asked_for() -> None:
    assert settings.from_env({}).check_transport == "http"
    assert settings.from_env({P + "CHECK_TRANSPORT": " GRPC "}).check_transport == "grpc"


def test_the_log_level_is_a_setting() -> None:
    assert settings.from_env({}).log_level == "INFO"
    assert settings.from_env({P + "LOG_LEVEL": " debug "}).log_level == "DEBUG"
    for bad in ("LOUD", "10", "info-ish"):
        with pytest.raises(settings.SettingsError, match=P + "LOG_LEVEL"):
            settings.from_env({P + "LOG_LEVEL": bad})
    with pytest.raises(settings.SettingsError, match=P + "LOG_LEVEL"):
        settings.Settings(log_level="verbose")


def test_the_hot_path_pool_size_is_a_bounded_setting() -> None:
    assert settings.from_env({}).hot_path_pool_size == 10
    assert settings.from_env({P + "HOT_PATH_POOL_SIZE": "32"}).hot_path_pool_size == 32
    for bad in ("3", "1001", "ten"):
        with pytest.raises(settings.SettingsError, match=P + "HOT_PATH_POOL_SIZE"):
            settings.from_env({P + "HOT_PATH_POOL_SIZE": bad})
    with pytest.raises(settings.SettingsError, match=P + "HOT_PATH_POOL_SIZE"):
        settings.Settings(hot_path_pool_size=0)


def test_the_smallest_hot_path_pool_serves_every_lane_and_worker_at_once() -> None:
    assert settings.HOT_PATH_POOL_SIZE_MIN >= check.HOLD_LANES + access_log.WORKERS


@pytest.mark.parametrize("old", ["HOLD_DEFAULT_MAX_TOKENS", "MODEL_OUTPUT_TOKENS_DEFAULT"])
def test_the_guessed_output_limit_is_gone_and_start_up_says_what_replaces_it(old: str) -> None:
    """A guessed limit capped holds below what a backend may produce; it is declared per model now."""
    with pytest.raises(settings.SettingsError) as caught:
        settings.from_env({P + old: "4096"})
    assert P + old in str(caught.value) and "max_output_tokens" in str(caught.value)


def test_the_metrics_port_is_off_unless_set_and_a_port_of_its_own() -> None:
    assert settings.from_env({}).metrics_port == 0
    assert settings.from_env({P + "METRICS_PORT": "9102"}).metrics_port == 9102
    for bad in ("-1", "65536", "metrics", "9102.0"):
        with pytest.raises(settings.SettingsError, match=P + "METRICS_PORT"):
            settings.from_env({P + "METRICS_PORT": bad})
    with pytest.raises(settings.SettingsError, match=P + "METRICS_PORT"):
        settings.Settings(metrics_port=70000)


@pytest.mark.parametrize("other", ["GATEWAY_PORT", "API_PORT", "GRPC_PORT", "CHECK_PORT", "ADMIN_PORT"])
def test_the_metrics_port_may_not_be_another_port(other: str) -> None:
    port = str(getattr(settings.Settings(), other.lower()))
    with pytest.raises(settings.SettingsError, match=f"{P}METRICS_PORT .*{P}{other}"):
        settings.from_env({P + "METRICS_PORT": port})
    # 0 (off) is no port, whatever the others are.
    assert settings.from_env({P + other: "18000", P + "METRICS_PORT": "0"}).metrics_port == 0
