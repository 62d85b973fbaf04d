"""The words Envoy and the sidecar must agree on, defined once.

Why a module of its own: Envoy's configuration (envoy_config.py) writes these names, the Check
(check.py, check_http.py) answers with them, the access log (access_log.py) reads them back, and
the usage filter (usage_filter.lua) reads and writes some of them inside Envoy. A name that
differs between two of them fails silently: the request is served and never billed, or billed
its hold. So each value lives here, and every side takes it from here under the same name.

How the Check's facts travel: the Check admits a request with ``x-billingproxy-*`` answer headers
(:func:`metadata_header`); Envoy files them as dynamic metadata under :data:`AUTHZ_NAMESPACE`
(ext_authz's ``dynamic_metadata_from_headers``; the gRPC flavour returns the same names), where the
Lua filter and the access log find them. Values are %-escaped (:func:`metadata_value`): a model name
comes from the client's body and could otherwise break a header. The Lua filter files what it
found in the answer under :data:`USAGE_NAMESPACE`, as :data:`USAGE`, :data:`USAGE_START` and
:data:`FINISHED`.

Sharp edge: Lua cannot import Python. Rather than keep literal copies in usage_filter.lua,
envoy_config.py renders :data:`LUA_CONSTANTS` into it (the file's lines marked ``-- rendered:
contract``), so the Lua runs with these very values; tests/unit/test_contract.py checks that the
file has a marker for each and no literal copy of its own. upstream_headers.lua uses none of them.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

#: Where Envoy files what the Check answered (the ext_authz filter's own name).
AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
#: Where the usage filter files the answer's usage.
USAGE_NAMESPACE = "billingproxy.usage"
#: Check answer headers with this prefix become dynamic metadata (and never request headers).
METADATA_HEADER_PREFIX = "x-billingproxy-"
#: The HTTP Check server sees this prefix + the client's path.
CHECK_PATH_PREFIX = "/check"
#: What Envoy answers when the Check failed or timed out (ext_authz ``status_on_error``).
CHECK_FAILED_STATUS = 503
#: The gRPC metadata key under which Envoy's access log sends the access-log secret.
ACCESS_LOG_SECRET_HEADER = "x-billingproxy-access-log-secret"

# The usage filter's findings, in USAGE_NAMESPACE.
#: The raw JSON text of the answer's final usage object ("" when it was too large).
USAGE = "usage"
#: Anthropic's message_start usage (streams only).
USAGE_START = "usage_start"
#: True only once the answer's terminal event was seen.
FINISHED = "finished"


def metadata_header(fact: str) -> str:
    """The header (and metadata key) that carries one of the Check's facts.

    hold_id → x-billingproxy-hold-id.
    """
    return METADATA_HEADER_PREFIX + fact.replace("_", "-")


def metadata_value(value: str) -> str:
    """A header-safe form of a fact's value: %-escaped."""
    return quote(value, safe="")


def metadata_read(encoded: str) -> str:
    """A fact's value as the Check meant it (the inverse of :func:`metadata_value`)."""
    return unquote(encoded)


# The Check's facts (the names :func:`metadata_header` turns into headers).
HOLD_ID = metadata_header("hold_id")
WALLET_ID = metadata_header("wallet_id")
MODEL = metadata_header("model")
#: The answer's usage format (billing.usage.Format); no format: the Lua filter reads nothing.
FORMAT = metadata_header("format")
#: "1": an OpenAI chat stream the Lua filter must ask for usage (stream_options.include_usage).
STREAM_USAGE = metadata_header("stream_usage")

#: What usage_filter.lua uses, by the name of its Lua local.
LUA_CONSTANTS = {
    "AUTHZ_NAMESPACE": AUTHZ_NAMESPACE,
    "USAGE_NAMESPACE": USAGE_NAMESPACE,
    "FORMAT_KEY": FORMAT,
    "STREAM_USAGE_KEY": STREAM_USAGE,
    "USAGE": USAGE,
    "USAGE_START": USAGE_START,
    "FINISHED": FINISHED,
}
