"""Every error a client can see, in OpenAI's shape: ``{"error": {"message", "type", "code"}}``.

One class for the Check's denials and the HTTP API's 4xx, so the same problem reads the same
through both, and clients can branch on ``code`` rather than on the message.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from billing import key_limits, money


# Not frozen: Python and contextlib write an exception's __traceback__ as it leaves an
# ``async with`` (contextlib.asynccontextmanager's __aexit__ does it in Python code), and a frozen
# dataclass refuses that write, so the client would get a 500 instead of this answer.
# eq=False: an exception keeps identity equality and stays hashable.
@dataclasses.dataclass(eq=False)
class ApiError(Exception):
    status: int
    code: str
    message: str
    type: str = "invalid_request_error"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "code": self.code, **self.extra}
        return json.dumps({"error": error}, separators=(",", ":")).encode()

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


# The one answer when billing cannot decide (the database unreachable, the Check failing or slower
# than Envoy waits): fail closed, with no internals. The Check, the HTTP API and Envoy's own local
# reply (envoy_config.py) all give exactly this.
BILLING_UNAVAILABLE = ApiError(
    503, "billing_unavailable", "Billing is unavailable; retry shortly.", "api_error"
)


def missing_key() -> ApiError:
    return ApiError(
        401,
        "missing_api_key",
        "No API key: send it as 'Authorization: Bearer sk-litellm-…'.",
        "authentication_error",
    )


def invalid_key() -> ApiError:
    return ApiError(401, "invalid_api_key", "Incorrect API key provided.", "authentication_error")


def key_refused(reason: str) -> ApiError:
    return ApiError(401, f"{reason}_api_key", f"This API key is {reason}.", "authentication_error")


def insufficient_funds(top_up_url: str, balance_usd: str, **details: Any) -> ApiError:
    """The journey's 403. ``details`` make it actionable (check.py): ``reason`` ("wallet_empty" or
    "request_too_large"), the request's ``worst_case_usd``, ``available_usd``,
    ``overdraft_limit_usd`` and ``max_tokens_that_fit``."""
    return ApiError(
        403,
        "insufficient_funds",
        "Insufficient funds. Please top up.",
        "insufficient_funds",
        {"top_up_url": top_up_url, "balance_usd": balance_usd, **details},
    )


def wallet_suspended() -> ApiError:
    return ApiError(
        403,
        "wallet_suspended",
        "This wallet is suspended. Contact the operator of this gateway.",
        "permission_error",
    )


def payment_disputed() -> ApiError:
    # No top_up_url: paying in does not lift the hold; the dispute closing does.
    return ApiError(
        403,
        "payment_disputed",
        "This wallet is on hold while a payment dispute is open.",
        "permission_error",
    )


def wallet_not_found() -> ApiError:
    # Not insufficient_funds: no top-up could help. The key was valid, so this names no wallet the
    # client could not already reach.
    return ApiError(
        403,
        "wallet_not_found",
        "This API key's wallet no longer exists. Contact the operator of this gateway.",
        "permission_error",
    )


def payments_unavailable() -> ApiError:
    """Stripe could not be reached (connection, rate limit): worth retrying."""
    return ApiError(
        503, "payments_unavailable", "The payment provider cannot be reached; retry shortly.", "api_error"
    )


def payments_refused(message: str) -> ApiError:
    """Stripe answered with an error the client cannot fix by retrying now."""
    return ApiError(502, "payments_error", message, "api_error")


def funds_reserved(retry_after_s: int) -> ApiError:
    return ApiError(
        429,
        "funds_reserved",
        "All remaining credit is reserved by requests in flight; retry shortly.",
        "rate_limit_error",
        headers={"retry-after": str(retry_after_s)},
    )


def key_limit_reached(limit: key_limits.KeyLimit, request_nano: int) -> ApiError:
    # No top_up_url: paying in does not lift a key's own limit; its window's reset does.
    reset = limit.resets_at
    return ApiError(
        403,
        "key_limit_reached",
        limit.describe(request_nano),
        "permission_error",
        {
            "limit_usd": money.format_usd(limit.limit_nano),
            "window": limit.window.value,
            "resets_at": None if reset is None else key_limits.iso(reset),
            "spent_usd": money.format_usd(limit.spent_nano),
            "reserved_usd": money.format_usd(limit.reserved_nano),
            "worst_case_usd": money.format_usd(request_nano),
        },
    )
