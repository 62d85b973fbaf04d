"""Every configuration value of BillingProxy, read once from the environment and checked.

Why one frozen object: the sidecar, the rendered Envoy config, the operator and the local stack all
read the same values, so there is one place that names a setting, gives its default and rejects a
bad value at start-up with a message that says which variable is wrong and what it expects.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from billing import alert_mail, emails, errors, money
from billing.endpoints import ENDPOINT_NAMES

ENV_PREFIX = "BILLINGPROXY_"
# The largest overdraft limit a wallet may have: what the CRD's USD pattern allows (under $10M).
OVERDRAFT_LIMIT_NANO_MAX = 10_000_000 * money.NANO_PER_USD - 1

# Where the sidecar listens and Envoy reaches it: loopback, i.e. in Kubernetes the pod's own
# network namespace. Nothing outside the pod (or the machine) may report usage or call the Check;
# only Envoy's public listener follows ``bind_host`` (docs/architecture.md, "Listeners").
INTERNAL_HOST = "127.0.0.1"
BACKEND_AUTH_HEADERS = ("authorization", "x-api-key")
ACCESS_LOG_SECRET_CHARS_MIN = 32
# Headers no setting may forward upstream: credentials (the client's own, or ones the backend
# would honour), cookies, and names the gateway itself uses.
UPSTREAM_HEADERS_NEVER = (
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "proxy-authorization",
    "cookie",
)
UPSTREAM_PREFIXES_NEVER = ("x-billingproxy-", "x-envoy-", ":")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
HOT_PATH_POOL_SIZE_MIN = 4
HOT_PATH_POOL_SIZE_MAX = 1000


class SettingsError(errors.UserFacingError, ValueError):
    """A configuration value is missing or malformed; the message names the variable and the fix."""


# Variables renamed so that their unit or qualifier comes last (old name → new name, after
# ENV_PREFIX). An old name still set would otherwise be ignored without a word, so start-up
# refuses it, naming the new one.
RENAMED = {
    "HTTP_PORT": "API_PORT",
    "REQUEST_BODY_MAX_BYTES": "REQUEST_BODY_BYTES_MAX",
    "TOPUP_MIN_USD": "TOPUP_USD_MIN",
    "TOPUP_MAX_USD": "TOPUP_USD_MAX",
}
# Variables no longer read, and what replaces them. A guessed output limit for models the price
# map gives none was a cap a client could ask past, and a settlement never charges more than its
# hold: such a model's requests now set their own bound, or its limit is declared per model.
REMOVED = {
    name: "declare the model's max_output_tokens in BILLINGPROXY_PRICE_OVERRIDES (docs/pricing.md)"
    for name in ("HOLD_DEFAULT_MAX_TOKENS", "MODEL_OUTPUT_TOKENS_DEFAULT")
}


@dataclasses.dataclass(frozen=True)
class Settings:
    # --- storage -------------------------------------------------------------------------------
    # -- PostgreSQL URL (postgresql://user:pass@host:port/db). Empty: `billingproxy up` embeds one.
    database_url: str = ""
    # -- where `billingproxy up` keeps the embedded database and run files.
    data_dir: Path = Path(".data")

    # --- money ---------------------------------------------------------------------------------
    # -- credit given to every new self-service wallet, in nano-USD ($0.50).
    free_grant_nano: int = 500_000_000
    # -- "overdraft": admit while balance - reserved - hold >= -(the wallet's overdraft limit);
    #    "strict": the same with every limit taken as 0 (never below zero).
    admission: str = "overdraft"
    # -- overdraft limit of every new wallet that is not a self-service signup (a Wallet resource
    #    that sets no overdraftLimitUsd), in nano-USD ($1.00). Self-service wallets always get 0.
    overdraft_limit_nano: int = 1_000_000_000
    # -- a hold not settled after this long is expired: unreported, it keeps its reservation until
    #    its late report or its estimate's charge.
    hold_ttl_s: int = 600
    # -- an expired hold that no access log has reported after this much longer is charged its
    #    estimate, the request's worst case (docs/decisions/0030-unreported-holds.md).
    hold_report_grace_s: int = 900
    # -- YAML file of price overrides and aliases (see docs/pricing.md). Empty: none.
    price_overrides_path: Path | None = None
    # -- percentage added to every provider price, e.g. "20" or "12.5".
    markup_percent: Decimal = Decimal(0)

    # --- LLM backend ---------------------------------------------------------------------------
    # -- OpenAI-compatible base URL without /v1 (LiteLLM proxy, OpenAI, Gemini). Empty: `up` starts a demo.
    backend_url: str = ""
    # -- credential Envoy sends to the backend in place of the client's key. Empty: none.
    backend_api_key: str = ""
    # -- the endpoints the gateway meters and forwards, comma-separated names from
    #    billing/endpoints.py (chat_completions, completions, embeddings, responses, messages,
    #    models); every other path answers 404 endpoint_not_supported without reaching the backend.
    endpoints: tuple[str, ...] = ENDPOINT_NAMES

    # --- network -------------------------------------------------------------------------------
    # -- address Envoy's public listener (the gateway) binds to. The sidecar's listeners and
    #    Envoy's clusters to them are on INTERNAL_HOST whatever this says.
    bind_host: str = "127.0.0.1"
    # -- Envoy's public port (the gateway).
    gateway_port: int = 8080
    # -- the sidecar's public API (signup, billing, top-ups; HTTP), reached through Envoy only.
    api_port: int = 8081
    # -- the sidecar's gRPC port (access log service, grpc.health.v1).
    grpc_port: int = 9001
    # -- the sidecar's ext_authz Check port (HTTP; Envoy calls it for every /v1/ request).
    check_port: int = 9002
    # -- which ext_authz flavour Envoy uses: "http" (check_port) or "grpc" (grpc_port). The
    #    sidecar serves both.
    check_transport: str = "http"
    # -- the sidecar's admin port (/healthz, /readyz, /metrics), on loopback. Envoy's gateway never
    #    routes to it; its metrics listener (METRICS_PORT) serves GET /metrics from it.
    admin_port: int = 9090
    # -- Envoy's metrics listener on bind_host, for Prometheus: GET /metrics is the sidecar's
    #    /metrics, GET /metrics/envoy Envoy's own; nothing else. 0: no such listener.
    metrics_port: int = 0
    # -- the URL clients use to reach the gateway; links in answers (top_up_url) start with it.
    public_url: str = "http://127.0.0.1:8080"
    # -- the shared secret Envoy sends in the access-log stream's gRPC metadata; the sidecar
    #    settles nothing from a stream without it. Required to serve; `billingproxy up` makes a
    #    new one each run.
    access_log_secret: str = dataclasses.field(default="", repr=False)
    # -- the request header the backend credential goes in: "authorization" (Bearer <key>;
    #    OpenAI, Gemini, LiteLLM) or "x-api-key" (the key itself; Anthropic).
    backend_auth_header: str = "authorization"
    # -- request headers forwarded to the backend besides the built-in allow-list
    #    (authz_sidecar/envoy_config.py, UPSTREAM_HEADERS); "name-*" allows a prefix.
    upstream_headers: tuple[str, ...] = ()
    # -- whether Envoy also streams its access log to the sidecar over gRPC (settles within
    #    milliseconds). Off: the JSON access-log file alone settles, within about a second.
    access_log_grpc: bool = True
    # -- the sidecar rotates Envoy's JSON access-log file (<data_dir>/access-log/access.log) once
    #    it has settled this many bytes of it, keeping one rotated file (docs/failures.md).
    access_log_rotate_bytes: int = 64 * 1024 * 1024

    # --- limits --------------------------------------------------------------------------------
    # -- largest request body Envoy buffers for the Check (it needs the model); larger → 413.
    request_body_bytes_max: int = 4 * 1024 * 1024
    # -- how long a key look-up is cached in the sidecar; bounds how late a revocation is seen.
    key_cache_ttl_ms: int = 500
    # -- signups accepted per client address per minute (an IPv6 client is its /64).
    signup_rate_per_minute: int = 5
    # -- signups accepted per minute by one sidecar, whatever the addresses: bounds the free
    #    grants given per minute (per replica) when many addresses each stay within their limit.
    signup_rate_global_per_minute: int = 60
    # -- proxies in front of Envoy that append to X-Forwarded-For (a load balancer: 1). 0: the
    #    client is Envoy's peer. N: the Nth address from the right of X-Forwarded-For, as Envoy
    #    received it (Envoy's xff_num_trusted_hops); the signup limit counts per that address.
    trusted_proxy_hops: int = 0
    # -- which addresses share a free grant: "mailbox" (addresses that reach one inbox: +tags,
    #    Gmail's dots and googlemail.com; see billing/emails.py) or "exact" (only letter case).
    signup_email_policy: str = "mailbox"
    # -- largest page of /billing/usage.
    usage_page_size_max: int = 100
    # -- active keys a self-service wallet may hold: POST /billing/keys is refused (409
    #    too_many_keys) at this many, until one is revoked.
    keys_per_wallet_max: int = 20
    # -- how long Envoy waits for the backend; kept below hold_ttl_s so a hold outlives its request.
    upstream_timeout_s: int = 300
    # -- how long Envoy waits for the Check before refusing the request (503 billing_unavailable,
    #    never served unbilled). Long enough for a burst of requests queued at a busy sidecar.
    check_timeout_ms: int = 3000

    # --- payments (Stripe; see docs/stripe.md) --------------------------------------------------
    # -- STRIPE_SECRET_KEY (sk_test_…, sk_live_…, rk_…). Empty: top-ups answer 503, and
    #    `billingproxy up` starts its local test double instead.
    stripe_secret_key: str = dataclasses.field(default="", repr=False)
    # -- STRIPE_WEBHOOK_SECRET, the webhook endpoint's signing secret (whsec_…); set with the key.
    stripe_webhook_secret: str = dataclasses.field(default="", repr=False)
    # -- STRIPE_API_BASE: where the Stripe SDK sends API calls. Empty: Stripe itself; set only to
    #    point at a test double (never with a live key).
    stripe_api_base: str = ""
    # -- smallest top-up, whole cents ($5).
    topup_nano_min: int = 5 * money.NANO_PER_USD
    # -- largest top-up, whole cents ($500).
    topup_nano_max: int = 500 * money.NANO_PER_USD

    # --- low-balance alerts (docs/alerts.md) ----------------------------------------------------
    # -- how often each sidecar looks for thresholds crossed and posts due alert events.
    alert_interval_ms: int = 2000
    # -- the wait before an alert's second attempt; each later one waits twice the one before.
    alert_retry_base_ms: int = 30_000
    # -- how long after an alert event was made its delivery is retried before it is given up.
    alert_retry_for_s: int = 86_400
    # -- allow alert webhooks over plain http and to loopback, link-local and private addresses
    #    (the dev stack and the tests). Off in production: the URL is the user's, and the sidecar
    #    posts from inside the pod (docs/decisions/0033-low-balance-alerts.md).
    alert_allow_private: bool = False
    # -- where alert mail is sent, smtp://user:password@host:587 (STARTTLS, required
    #    when a password is given) or smtps://user:password@host:465 (TLS). Empty: no mail. Every
    #    alert event but alert.test is then also mailed to its wallet's email address
    #    (docs/alerts.md).
    smtp_url: str = dataclasses.field(default="", repr=False)
    # -- the From of alert mail, alerts@example.com or "BillingProxy
    #    <alerts@example.com>"; required with SMTP_URL.
    smtp_from: str = ""

    # --- auto-recharge (docs/stripe.md, docs/decisions/0034-auto-recharge.md) --------------------
    # -- how often each sidecar looks for wallets below their auto-recharge threshold and charges
    #    their saved card (a wallet can fall this long below its threshold before one starts).
    auto_recharge_interval_ms: int = 2000
    # -- consecutive declined (or authentication-required) recharges after which auto-recharge
    #    pauses itself until its owner PUTs the setting again.
    auto_recharge_failures_max: int = 3
    # -- the wait before a recharge is retried after Stripe could not be reached (same idempotency
    #    key, so never a second charge); each later retry waits twice the one before, up to an hour.
    auto_recharge_retry_base_ms: int = 5000

    # --- operations ----------------------------------------------------------------------------
    # -- how much the `billingproxy` processes log: DEBUG, INFO, WARNING, ERROR or CRITICAL.
    log_level: str = "INFO"
    # -- connections of the sidecar's hot-path pool (the Check's holds, the access log's
    #    settlements, the key cache, the expiry sweep, the alert worker between its posts), from 4
    #    (one per hold lane and settlement worker) to 1000. More let more transactions run at
    #    once, up to what PostgreSQL can run.
    hot_path_pool_size: int = 10

    @property
    def access_log_path(self) -> Path:
        """Envoy's JSON access log, which the sidecar follows (authz_sidecar/access_log_file.py):
        in the data dir locally, on the volume the gateway pod's two containers share."""
        return self.data_dir.absolute() / "access-log" / "access.log"

    @property
    def envoy_admin_socket(self) -> Path:
        """Envoy's admin interface, a Unix socket (mode 0600): where the rendered config puts it
        unless told otherwise, and where the sidecar and the pod's probes ask it."""
        return self.data_dir.absolute() / "run" / "envoy-admin.sock"

    @property
    def strict(self) -> bool:
        return self.admission == "strict"

    @property
    def smtp_server(self) -> alert_mail.SmtpServer | None:
        """Where alert mail goes; None when mail is off."""
        return alert_mail.parse_smtp_url(self.smtp_url) if self.smtp_url else None

    @property
    def stripe_configured(self) -> bool:
        return bool(self.stripe_secret_key)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def __post_init__(self) -> None:
        if self.admission not in ("overdraft", "strict"):
            raise SettingsError(
                f"{ENV_PREFIX}ADMISSION must be 'overdraft' or 'strict', not {self.admission!r}"
            )
        if self.check_transport not in ("http", "grpc"):
            raise SettingsError(
                f"{ENV_PREFIX}CHECK_TRANSPORT must be 'http' or 'grpc', not {self.check_transport!r}"
            )
        unknown = [name for name in self.endpoints if name not in ENDPOINT_NAMES]
        if unknown or not self.endpoints:
            raise SettingsError(
                f"{ENV_PREFIX}ENDPOINTS must name one or more of {', '.join(ENDPOINT_NAMES)}, "
                f"not {','.join(self.endpoints)!r}"
            )
        if self.signup_email_policy not in emails.POLICIES:
            raise SettingsError(
                f"{ENV_PREFIX}SIGNUP_EMAIL_POLICY must be one of {', '.join(emails.POLICIES)}, "
                f"not {self.signup_email_policy!r}"
            )
        if self.upstream_timeout_s * 1000 + self.check_timeout_ms >= self.hold_ttl_s * 1000:
            raise SettingsError(
                f"{ENV_PREFIX}UPSTREAM_TIMEOUT_S ({self.upstream_timeout_s}) plus "
                f"{ENV_PREFIX}CHECK_TIMEOUT_MS ({self.check_timeout_ms}) must be below "
                f"{ENV_PREFIX}HOLD_TTL_S ({self.hold_ttl_s}): a hold must outlive its request"
            )
        if self.free_grant_nano < 0:
            raise SettingsError(f"{ENV_PREFIX}FREE_GRANT_USD must not be negative")
        if not 0 <= self.overdraft_limit_nano <= OVERDRAFT_LIMIT_NANO_MAX:
            raise SettingsError(
                f"{ENV_PREFIX}OVERDRAFT_LIMIT_USD must be from 0 to "
                f"{money.format_usd(OVERDRAFT_LIMIT_NANO_MAX)}"
            )
        if self.markup_percent < 0:
            raise SettingsError(f"{ENV_PREFIX}MARKUP_PERCENT must not be negative")
        if self.backend_url and not re.fullmatch(r"https?://[^/\s]+(/[^\s]*)?", self.backend_url):
            raise SettingsError(
                f"{ENV_PREFIX}BACKEND_URL must be an http(s) URL such as http://127.0.0.1:4000, "
                f"not {self.backend_url!r}"
            )
        if not re.fullmatch(r"[\x21-\x7e]*", self.backend_api_key):
            # It is sent as a header value: spaces, line breaks or non-ASCII would break the request.
            raise SettingsError(
                f"{ENV_PREFIX}BACKEND_API_KEY may contain only visible ASCII characters "
                "(no spaces, line breaks or accents)"
            )
        if not re.fullmatch(r"https?://[^/\s]+(/[^\s]*)?", self.public_url):
            raise SettingsError(f"{ENV_PREFIX}PUBLIC_URL must be an http(s) URL, not {self.public_url!r}")
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(
                f"{ENV_PREFIX}LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}"
            )
        if not HOT_PATH_POOL_SIZE_MIN <= self.hot_path_pool_size <= HOT_PATH_POOL_SIZE_MAX:
            raise SettingsError(
                f"{ENV_PREFIX}HOT_PATH_POOL_SIZE must be between {HOT_PATH_POOL_SIZE_MIN} and "
                f"{HOT_PATH_POOL_SIZE_MAX}, not {self.hot_path_pool_size}"
            )
        self._check_network()
        self._check_ports()
        self._check_stripe()
        self._check_smtp()

    def _check_smtp(self) -> None:
        if not self.smtp_url:
            return
        try:
            alert_mail.parse_smtp_url(self.smtp_url)
        except alert_mail.InvalidSmtpUrl as exc:
            # Never the URL itself in the message: it may carry the password.
            raise SettingsError(f"{ENV_PREFIX}SMTP_URL {exc}") from None
        try:
            alert_mail.check_sender(self.smtp_from)
        except alert_mail.InvalidAddress as exc:
            raise SettingsError(
                f"{ENV_PREFIX}SMTP_FROM must be the From of alert mail, such as alerts@example.com, "
                f"when {ENV_PREFIX}SMTP_URL is set ({exc})"
            ) from None

    def _check_ports(self) -> None:
        if not 0 <= self.metrics_port <= 65535:
            raise SettingsError(
                f"{ENV_PREFIX}METRICS_PORT must be a port (1 to 65535), or 0 for no metrics listener, "
                f"not {self.metrics_port}"
            )
        if self.metrics_port:
            others = {
                "GATEWAY_PORT": self.gateway_port,
                "API_PORT": self.api_port,
                "GRPC_PORT": self.grpc_port,
                "CHECK_PORT": self.check_port,
                "ADMIN_PORT": self.admin_port,
            }
            taken = [name for name, port in others.items() if port == self.metrics_port]
            if taken:
                raise SettingsError(
                    f"{ENV_PREFIX}METRICS_PORT ({self.metrics_port}) is also {ENV_PREFIX}{taken[0]}: "
                    "give the metrics listener a port of its own"
                )

    def _check_network(self) -> None:
        if self.backend_auth_header not in BACKEND_AUTH_HEADERS:
            raise SettingsError(
                f"{ENV_PREFIX}BACKEND_AUTH_HEADER must be 'authorization' (sends Bearer <key>) or "
                f"'x-api-key' (sends the key itself), not {self.backend_auth_header!r}"
            )
        secret = self.access_log_secret
        if secret and not (
            len(secret) >= ACCESS_LOG_SECRET_CHARS_MIN and re.fullmatch(r"[\x21-\x7e]+", secret)
        ):
            # Never echo it: the message names the rule only.
            raise SettingsError(
                f"{ENV_PREFIX}ACCESS_LOG_SECRET must be at least {ACCESS_LOG_SECRET_CHARS_MIN} visible "
                "ASCII characters (no spaces); e.g. `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`"
            )
        for name in self.upstream_headers:
            if not re.fullmatch(r"[a-z0-9][a-z0-9-]*\*?", name):
                raise SettingsError(
                    f"{ENV_PREFIX}UPSTREAM_HEADERS lists header names (letters, digits, '-'; a trailing "
                    f"'*' for a prefix), not {name!r}"
                )
            prefix = name.endswith("*")
            stem = name.rstrip("*")
            never = [n for n in UPSTREAM_HEADERS_NEVER if (n.startswith(stem) if prefix else n == stem)]
            never += [
                p for p in UPSTREAM_PREFIXES_NEVER if stem.startswith(p) or (prefix and p.startswith(stem))
            ]
            if never:
                raise SettingsError(
                    f"{ENV_PREFIX}UPSTREAM_HEADERS must not forward {name!r}: it would let {never[0]!r} "
                    "reach the backend (a credential, a cookie, or the gateway's own header)"
                )

    def _check_stripe(self) -> None:
        # Both or neither: with only the key, Checkout would take money whose webhook we could
        # never verify, so it would never be credited.
        if bool(self.stripe_secret_key) != bool(self.stripe_webhook_secret):
            raise SettingsError(
                "STRIPE_SECRET_KEY and STRIPE_WEBHOOK_SECRET must be set together (or both left "
                "empty to turn top-ups off): without the webhook secret, payments could never be credited"
            )
        if self.stripe_api_base:
            if not re.fullmatch(r"https?://[^/\s]+", self.stripe_api_base):
                raise SettingsError(
                    "STRIPE_API_BASE must be a base URL such as http://127.0.0.1:12111 (no path), "
                    f"not {self.stripe_api_base!r}"
                )
            if self.stripe_secret_key.startswith(("sk_live_", "rk_live_")):
                raise SettingsError(
                    "STRIPE_API_BASE points the SDK at a test double; it must not be used with a live key"
                )
        for name, nano in (("TOPUP_USD_MIN", self.topup_nano_min), ("TOPUP_USD_MAX", self.topup_nano_max)):
            # Stripe charges USD in whole cents, from $0.50 to $999,999.99.
            if nano % money.NANO_PER_CENT or not 50 <= nano // money.NANO_PER_CENT <= 99_999_999:
                raise SettingsError(
                    f"{ENV_PREFIX}{name} must be whole cents from 0.50 to 999999.99 (Stripe's limits), "
                    f"not {money.format_usd(nano)}"
                )
        if self.topup_nano_min > self.topup_nano_max:
            raise SettingsError(
                f"{ENV_PREFIX}TOPUP_USD_MIN ({money.format_usd(self.topup_nano_min)}) must not be above "
                f"{ENV_PREFIX}TOPUP_USD_MAX ({money.format_usd(self.topup_nano_max)})"
            )


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(ENV_PREFIX + name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{ENV_PREFIX}{name} must be a whole number, not {raw!r}") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{ENV_PREFIX}{name} must be between {lo} and {hi}, not {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = (env.get(ENV_PREFIX + name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{ENV_PREFIX}{name} must be true or false, not {raw!r}")


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    return _int(env, name, default, 1, 65535)


def _usd(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(ENV_PREFIX + name)
    if not raw:
        return default
    try:
        return money.parse_usd(raw.strip())
    except money.MoneyError as exc:
        raise SettingsError(f"{ENV_PREFIX}{name}: {exc}") from None


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from environment variables (``BILLINGPROXY_*`` and ``DATABASE_URL``)."""
    env = os.environ if env is None else env
    for old, new in RENAMED.items():
        if ENV_PREFIX + old in env:
            raise SettingsError(
                f"{ENV_PREFIX}{old} is no longer read: it was renamed {ENV_PREFIX}{new}; set that instead"
            )
    for old, instead in REMOVED.items():
        if ENV_PREFIX + old in env:
            raise SettingsError(f"{ENV_PREFIX}{old} is no longer read: {instead}")
    defaults = Settings()

    grant_raw = env.get(ENV_PREFIX + "FREE_GRANT_USD")
    try:
        free_grant = money.parse_usd(grant_raw) if grant_raw else defaults.free_grant_nano
    except money.MoneyError as exc:
        raise SettingsError(f"{ENV_PREFIX}FREE_GRANT_USD: {exc}") from None

    markup_raw = env.get(ENV_PREFIX + "MARKUP_PERCENT", "")
    try:
        markup = Decimal(markup_raw) if markup_raw else defaults.markup_percent
        if not markup.is_finite():
            raise InvalidOperation
    except InvalidOperation:
        raise SettingsError(
            f"{ENV_PREFIX}MARKUP_PERCENT must be a decimal number such as 20 or 12.5, not {markup_raw!r}"
        ) from None

    overrides_raw = env.get(ENV_PREFIX + "PRICE_OVERRIDES", "")
    overrides = Path(overrides_raw) if overrides_raw else None
    if overrides is not None and not overrides.is_file():
        raise SettingsError(f"{ENV_PREFIX}PRICE_OVERRIDES names {overrides_raw!r}, which is not a file")

    gateway_port = _port(env, "GATEWAY_PORT", defaults.gateway_port)
    bind_host = env.get(ENV_PREFIX + "BIND_HOST") or defaults.bind_host
    public_default = f"http://{'127.0.0.1' if bind_host in ('0.0.0.0', '::') else bind_host}:{gateway_port}"

    return Settings(
        database_url=env.get("DATABASE_URL", ""),
        data_dir=Path(env.get(ENV_PREFIX + "DATA_DIR") or defaults.data_dir),
        free_grant_nano=free_grant,
        admission=(env.get(ENV_PREFIX + "ADMISSION") or defaults.admission).strip().lower(),
        overdraft_limit_nano=_usd(env, "OVERDRAFT_LIMIT_USD", defaults.overdraft_limit_nano),
        hold_ttl_s=_int(env, "HOLD_TTL_S", defaults.hold_ttl_s, 10, 86_400),
        hold_report_grace_s=_int(env, "HOLD_REPORT_GRACE_S", defaults.hold_report_grace_s, 0, 7 * 86_400),
        price_overrides_path=overrides,
        markup_percent=markup,
        backend_url=(env.get(ENV_PREFIX + "BACKEND_URL") or "").rstrip("/"),
        backend_api_key=env.get(ENV_PREFIX + "BACKEND_API_KEY", ""),
        endpoints=tuple(
            name.strip()
            for name in (env.get(ENV_PREFIX + "ENDPOINTS") or ",".join(defaults.endpoints)).split(",")
            if name.strip()
        ),
        bind_host=bind_host,
        gateway_port=gateway_port,
        api_port=_port(env, "API_PORT", defaults.api_port),
        grpc_port=_port(env, "GRPC_PORT", defaults.grpc_port),
        check_port=_port(env, "CHECK_PORT", defaults.check_port),
        check_transport=(env.get(ENV_PREFIX + "CHECK_TRANSPORT") or defaults.check_transport).strip().lower(),
        admin_port=_port(env, "ADMIN_PORT", defaults.admin_port),
        metrics_port=_int(env, "METRICS_PORT", defaults.metrics_port, 0, 65535),
        public_url=(env.get(ENV_PREFIX + "PUBLIC_URL") or public_default).rstrip("/"),
        access_log_secret=env.get(ENV_PREFIX + "ACCESS_LOG_SECRET", "").strip(),
        access_log_grpc=_bool(env, "ACCESS_LOG_GRPC", defaults.access_log_grpc),
        access_log_rotate_bytes=_int(
            env, "ACCESS_LOG_ROTATE_BYTES", defaults.access_log_rotate_bytes, 4096, 4 * 1024**3
        ),
        backend_auth_header=(env.get(ENV_PREFIX + "BACKEND_AUTH_HEADER") or defaults.backend_auth_header)
        .strip()
        .lower(),
        upstream_headers=tuple(
            name.strip().lower()
            for name in env.get(ENV_PREFIX + "UPSTREAM_HEADERS", "").split(",")
            if name.strip()
        ),
        request_body_bytes_max=_int(
            env, "REQUEST_BODY_BYTES_MAX", defaults.request_body_bytes_max, 1024, 64 * 1024 * 1024
        ),
        key_cache_ttl_ms=_int(env, "KEY_CACHE_TTL_MS", defaults.key_cache_ttl_ms, 0, 1000),
        signup_rate_per_minute=_int(
            env, "SIGNUP_RATE_PER_MINUTE", defaults.signup_rate_per_minute, 1, 1_000_000
        ),
        signup_rate_global_per_minute=_int(
            env, "SIGNUP_RATE_GLOBAL_PER_MINUTE", defaults.signup_rate_global_per_minute, 1, 1_000_000
        ),
        trusted_proxy_hops=_int(env, "TRUSTED_PROXY_HOPS", defaults.trusted_proxy_hops, 0, 10),
        signup_email_policy=(env.get(ENV_PREFIX + "SIGNUP_EMAIL_POLICY") or defaults.signup_email_policy)
        .strip()
        .lower(),
        usage_page_size_max=_int(env, "USAGE_PAGE_SIZE_MAX", defaults.usage_page_size_max, 1, 1000),
        keys_per_wallet_max=_int(env, "KEYS_PER_WALLET_MAX", defaults.keys_per_wallet_max, 1, 1000),
        upstream_timeout_s=_int(env, "UPSTREAM_TIMEOUT_S", defaults.upstream_timeout_s, 1, 86_400),
        check_timeout_ms=_int(env, "CHECK_TIMEOUT_MS", defaults.check_timeout_ms, 100, 30_000),
        stripe_secret_key=env.get("STRIPE_SECRET_KEY", "").strip(),
        stripe_webhook_secret=env.get("STRIPE_WEBHOOK_SECRET", "").strip(),
        stripe_api_base=env.get("STRIPE_API_BASE", "").strip().rstrip("/"),
        topup_nano_min=_usd(env, "TOPUP_USD_MIN", defaults.topup_nano_min),
        topup_nano_max=_usd(env, "TOPUP_USD_MAX", defaults.topup_nano_max),
        alert_interval_ms=_int(env, "ALERT_INTERVAL_MS", defaults.alert_interval_ms, 50, 60_000),
        alert_retry_base_ms=_int(env, "ALERT_RETRY_BASE_MS", defaults.alert_retry_base_ms, 10, 3_600_000),
        alert_retry_for_s=_int(env, "ALERT_RETRY_FOR_S", defaults.alert_retry_for_s, 0, 7 * 86_400),
        alert_allow_private=_bool(env, "ALERT_ALLOW_PRIVATE", defaults.alert_allow_private),
        smtp_url=env.get(ENV_PREFIX + "SMTP_URL", "").strip(),
        smtp_from=env.get(ENV_PREFIX + "SMTP_FROM", "").strip(),
        auto_recharge_interval_ms=_int(
            env, "AUTO_RECHARGE_INTERVAL_MS", defaults.auto_recharge_interval_ms, 50, 60_000
        ),
        auto_recharge_failures_max=_int(
            env, "AUTO_RECHARGE_FAILURES_MAX", defaults.auto_recharge_failures_max, 1, 100
        ),
        auto_recharge_retry_base_ms=_int(
            env, "AUTO_RECHARGE_RETRY_BASE_MS", defaults.auto_recharge_retry_base_ms, 10, 3_600_000
        ),
        log_level=(env.get(ENV_PREFIX + "LOG_LEVEL") or defaults.log_level).strip().upper(),
        hot_path_pool_size=_int(
            env,
            "HOT_PATH_POOL_SIZE",
            defaults.hot_path_pool_size,
            HOT_PATH_POOL_SIZE_MIN,
            HOT_PATH_POOL_SIZE_MAX,
        ),
    )
