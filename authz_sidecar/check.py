"""Envoy's ext_authz Check, as a billing rule: key → model price → hold → admit, or a denial.

``Decider`` is the rule, free of any wire format. Envoy reaches it through one of ext_authz's two
flavours (``BILLINGPROXY_CHECK_TRANSPORT``): ``check_http.py`` (HTTP, the default: measured
~20× cheaper in Python) or ``check_grpc.py`` (the gRPC ``Check``). A denial is an
:class:`ApiError` the client sees as an OpenAI-shaped error. An admitted request's wallet, key and
hold ids travel to the access log as dynamic metadata in :data:`METADATA_NAMESPACE`, under the
same names either way (``x-billingproxy-*``: the HTTP flavour files answer headers under their
names).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any
from urllib.parse import quote, unquote

from authz_sidecar import api_errors, envoy_config, metrics
from authz_sidecar.group_commit import GroupCommit
from authz_sidecar.key_lookup import KeyLookup
from billing import database, holds, money, pricing, usage
from billing.settings import Settings

logger = logging.getLogger(__name__)

# The namespace Envoy files ext_authz dynamic metadata under (the access log reads it there),
# and the prefix of the answer headers it files (Envoy's dynamic_metadata_from_headers).
METADATA_NAMESPACE = envoy_config.AUTHZ_NAMESPACE
METADATA_HEADER_PREFIX = envoy_config.METADATA_HEADER_PREFIX


def metadata_header(field: str) -> str:
    """The header (and metadata key) that carries one of the Check's facts: hold_id → x-billingproxy-hold-id."""
    return METADATA_HEADER_PREFIX + field.replace("_", "-")


def metadata_value(value: str) -> str:
    """A header-safe form of a value (a model name comes from the client's body): %-escaped."""
    return quote(value, safe="")


def metadata_read(encoded: str) -> str:
    return unquote(encoded)


BILLING_UNAVAILABLE = api_errors.ApiError(
    503, "billing_unavailable", "Billing is unavailable; retry shortly.", "api_error"
)
# Output-token fields a client may set, newest name first (OpenAI renamed max_tokens).
_MAX_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_FREE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Holds are placed by at most HOLD_LANES transactions at once (pool connections they may take);
# Checks arriving meanwhile go together in the next one.
HOLD_LANES = 2
HOLD_BATCH_MAX = 64


class Decider:
    """The decision, separate from the wire formats (check_http.py, check_grpc.py) so it reads as
    the billing rule it is."""

    def __init__(
        self, settings: Settings, prices: pricing.PriceBook, db: database.Database, key_lookup: KeyLookup
    ) -> None:
        self._settings = settings
        self._prices = prices
        self._db = db  # the sidecar's asyncpg pool: the hold is one prepared statement
        self._keys = key_lookup
        self._top_up_url = f"{settings.public_url}/billing/topup"
        # Checks in flight together share one transaction (billing.holds.place_many).
        self._holds: GroupCommit[holds.HoldRequest, holds.Admission | holds.Refusal] = GroupCommit(
            self._place_holds, lanes=HOLD_LANES, batch_max=HOLD_BATCH_MAX, abandoned=self._void_abandoned
        )

    async def _place_holds(self, batch: list[holds.HoldRequest]) -> list[holds.Admission | holds.Refusal]:
        async with database.acquire(self._db) as conn:
            return await holds.place_many(
                conn, batch, ttl_s=self._settings.hold_ttl_s, strict=self._settings.strict
            )

    async def _void_abandoned(self, results: list[tuple[holds.HoldRequest, holds.Admission | holds.Refusal]]) -> None:
        """Holds placed for Checks that Envoy gave up on while their batch ran (it answered the
        client 503 and never forwards the request): void them now, not at the TTL sweep."""
        placed = [
            holds.SettleRequest(request.request_id, None, {"status": 503, "reason": "check_abandoned"},
                                wallet_id=request.wallet_id)
            for request, outcome in results if outcome is holds.Admission.ADMITTED
        ]
        if not placed:
            return
        async with database.acquire(self._db) as conn:
            outcomes = await holds.settle_many(conn, placed)
        for outcome in outcomes:
            metrics.settlements.labels(outcome.value).inc()
        logger.warning("voided %d holds of Checks Envoy gave up on", len(placed))

    async def judge(
        self, *, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> dict[str, str] | api_errors.ApiError:
        """:meth:`decide`, counted and timed, never raising — what both Check faces answer with.

        Admitted: the facts for the access log, as Envoy files them (``x-billingproxy-*`` name →
        %-escaped value). Denied: the error the client sees; an unexpected failure is logged
        here and answered 503 ``billing_unavailable`` (fail closed, no internals to the client).
        """
        started = time.perf_counter()
        outcome: dict[str, str] | api_errors.ApiError
        try:
            facts = await self.decide(method=method, path=path, headers=headers, body=body)
        except api_errors.ApiError as error:
            metrics.check_decisions.labels(error.code).inc()
            outcome = error
        except Exception:
            logger.exception("Check failed")
            metrics.check_decisions.labels("internal_error").inc()
            outcome = BILLING_UNAVAILABLE
        else:
            metrics.check_decisions.labels("allowed").inc()
            outcome = {metadata_header(field): metadata_value(value) for field, value in facts.items()}
        metrics.check_seconds.observe(time.perf_counter() - started)
        return outcome

    async def close(self) -> None:
        await self._holds.close()

    async def decide(
        self, *, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> dict[str, Any]:
        """Dynamic metadata for an admitted request; raises :class:`ApiError` to deny it."""
        key = await self._keys.authenticate(headers.get("authorization"))
        base = {"wallet_id": key.wallet_id, "key_id": key.id}
        if method in _FREE_METHODS:
            return base  # listing models costs nothing: no hold, nothing to settle

        request = _json_object(body)
        model = request.get("model")
        if not isinstance(model, str) or not model:
            raise api_errors.ApiError(
                400, "model_required", "The request body must be JSON with a \"model\" string."
            )
        price = self._prices.price(model)
        if price is None:
            raise api_errors.ApiError(
                400,
                "model_not_priced",
                f"The model {model!r} has no price on this gateway, so it cannot be billed.",
                extra={"param": "model"},
            )
        if key.allowed_models is not None and model not in key.allowed_models:
            raise api_errors.ApiError(
                400,
                "model_not_allowed",
                f"This API key may not use the model {model!r}.",
                extra={"param": "model"},
            )

        request_id = headers.get("x-request-id")
        if not request_id:
            # Envoy always sets it with the rendered config; without it nothing could be settled.
            raise api_errors.ApiError(503, "no_request_id", "The gateway is misconfigured.", "api_error")
        amount = self._prices.hold_nano(
            price,
            prompt_tokens=pricing.prompt_tokens_bound(len(body)),
            max_output_tokens=self._max_output_tokens(path, request, price),
        )
        outcome = await self._holds.submit(
            holds.HoldRequest(request_id, key.wallet_id, key.id, model, amount)
        )
        if outcome is holds.Admission.ADMITTED:
            return {**base, "hold_id": request_id, "model": model, **_usage_facts(path, request)}
        assert isinstance(outcome, holds.Refusal)
        if outcome.admission is holds.Admission.FUNDS_RESERVED:
            raise api_errors.funds_reserved(retry_after_s=1)
        if outcome.admission is holds.Admission.WALLET_SUSPENDED:
            raise api_errors.wallet_suspended()
        if outcome.admission is holds.Admission.WALLET_DISPUTED:
            raise api_errors.payment_disputed()
        if outcome.admission is holds.Admission.DUPLICATE_REQUEST:
            raise api_errors.ApiError(409, "duplicate_request", "This request id was already used.")
        raise api_errors.insufficient_funds(self._top_up_url, money.format_usd(outcome.balance_nano))

    def _max_output_tokens(self, path: str, request: dict[str, Any], price: pricing.ModelPrice) -> int:
        if path.split("?", 1)[0].endswith("/embeddings"):
            return 0
        requested = next(
            (request[f] for f in _MAX_OUTPUT_FIELDS if isinstance(request.get(f), int) and request[f] > 0),
            self._settings.hold_default_max_tokens,
        )
        limit = price.max_output_tokens
        return min(requested, limit) if limit else requested


# Where each endpoint's answer carries its usage (billing/usage.py), told to the Lua filter so it
# never guesses from the path itself. Interim: the endpoint table (billing/endpoints.py) replaces it.
_USAGE_FORMATS = {
    "/v1/chat/completions": usage.Format.OPENAI_CHAT,
    "/v1/completions": usage.Format.OPENAI_CHAT,
    "/v1/responses": usage.Format.OPENAI_RESPONSES,
    "/v1/embeddings": usage.Format.OPENAI_EMBEDDINGS,
    "/v1/messages": usage.Format.ANTHROPIC_MESSAGES,
}


def _usage_facts(path: str, request: dict[str, Any]) -> dict[str, str]:
    """``format``: the answer's usage format; ``stream_usage``: "1" when the Lua filter must turn
    on ``stream_options.include_usage`` (an OpenAI chat/completions stream)."""
    endpoint = path.split("?", 1)[0]
    usage_format = _USAGE_FORMATS.get(endpoint)
    if usage_format is None:
        return {}
    facts = {"format": usage_format.value}
    if usage_format is usage.Format.OPENAI_CHAT and request.get("stream") is True:
        facts["stream_usage"] = "1"
    return facts


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        request = None
    if not isinstance(request, dict):
        raise api_errors.ApiError(
            400, "invalid_json", "The request body must be a JSON object with a \"model\"."
        )
    return request
