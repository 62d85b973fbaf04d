"""Envoy's ext_authz Check, as a billing rule: endpoint → key → body → price → worst case → hold
→ admit, or a denial.

``Decider`` is the rule, free of any wire format. Envoy reaches it through one of ext_authz's two
flavours (``BILLINGPROXY_CHECK_TRANSPORT``): ``check_http.py`` (HTTP, the default: far cheaper in
Python, docs/benchmarks.md) or ``check_grpc.py`` (the gRPC ``Check``). A denial is an
:class:`ApiError` the client sees as an OpenAI-shaped error. An admitted request's wallet, key and
hold ids, the model and the answer's usage format travel to the access log (and the format and
whether to ask a stream for usage to the Lua filter) as dynamic metadata in
``contract.AUTHZ_NAMESPACE``, under the same names either way (``x-billingproxy-*``: the HTTP
flavour files answer headers under their names). What the table admits and how a worst case is
read is billing/endpoints.py; docs/security-model.md says why.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from authz_sidecar import api_errors, contract, metrics
from authz_sidecar.group_commit import GroupCommit
from authz_sidecar.key_lookup import KeyLookup
from billing import database, endpoints, hold_batches, holds, key_limits, money, pricing
from billing.settings import Settings

logger = logging.getLogger(__name__)

# Holds are placed by at most HOLD_LANES transactions at once (pool connections they may take);
# Checks arriving meanwhile go together in the next one.
HOLD_LANES = 2
HOLD_BATCH_MAX = 64
EMPTY_WALLETS_MAX = 10_000
# Keys refused for their limit, waiting for the sweep to queue their alert: at most this many
# (an alert is a courtesy; the Check never waits for one).
LIMIT_REFUSALS_MAX = 10_000
# The most bytes a client adds to its body by sending the suggested output limit
# (`, "max_completion_tokens": 1234567`).
OUTPUT_FIELD_BYTES = 40


class Decider:
    """The decision, separate from the wire formats (check_http.py, check_grpc.py) so it reads as
    the billing rule it is."""

    def __init__(
        self,
        settings: Settings,
        prices: pricing.PriceBook,
        db: database.Database,
        key_lookup: KeyLookup,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` (monotonic seconds) is all the empty-wallet memo knows of time; a test moves it."""
        self._settings = settings
        self._prices = prices
        self._db = db  # the sidecar's asyncpg pool: the hold is one prepared statement
        self._keys = key_lookup
        self._clock = clock
        self._endpoints = endpoints.EndpointTable(settings.endpoints)
        # Wallets refused as empty: wallet id → (refuse unparsed until, balance then).
        self._empty_wallets: dict[str, tuple[float, int]] = {}
        self._top_up_url = f"{settings.public_url}/account/top-up"
        # Keys refused for their limit, by (key, window start): the sweep queues one alert each
        # (billing.key_limits.queue_alert, idempotent per window) off the Check's path.
        self.limit_refusals: dict[tuple[str, str], key_limits.KeyLimit] = {}
        # Those the sweep has queued: a key refused all day is not queued again every round.
        self.limit_alerted: set[tuple[str, str]] = set()
        # Checks in flight together share one transaction (billing.hold_batches.place_many).
        self._holds: GroupCommit[hold_batches.HoldRequest, holds.Refusal | None] = GroupCommit(
            self._place_holds, lanes=HOLD_LANES, batch_max=HOLD_BATCH_MAX, abandoned=self._void_abandoned
        )

    async def _place_holds(self, batch: list[hold_batches.HoldRequest]) -> list[holds.Refusal | None]:
        async with database.acquire(self._db) as conn:
            return await hold_batches.place_many(
                conn, batch, ttl_s=self._settings.hold_ttl_s, strict=self._settings.strict
            )

    async def _void_abandoned(
        self, results: list[tuple[hold_batches.HoldRequest, holds.Refusal | None]]
    ) -> None:
        """Holds placed for Checks that Envoy gave up on while their batch ran (it answered the
        client 503 and never forwards the request): void them now, not at the TTL sweep."""
        placed = [
            hold_batches.SettleRequest(
                request.request_id,
                holds.Resolution.VOID,
                {"status": 503, "reason": "check_abandoned"},
                wallet_id=request.wallet_id,
            )
            for request, refusal in results
            if refusal is None
        ]
        if not placed:
            return
        async with database.acquire(self._db) as conn:
            outcomes = await hold_batches.settle_many(conn, placed)
        for outcome in outcomes:
            metrics.settlements.labels(outcome.value).inc()
        logger.warning("voided %d holds of Checks Envoy gave up on", len(placed))

    async def decide(
        self, *, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> dict[str, str] | api_errors.ApiError:
        """The Check's answer, counted and timed, never raising — what both Check faces answer with.

        Admitted: the facts for the access log, as Envoy files them (``x-billingproxy-*`` name →
        %-escaped value). Denied: the error the client sees; an unexpected failure is logged
        here and answered 503 ``billing_unavailable`` (fail closed, no internals to the client).
        """
        started = time.perf_counter()
        outcome: dict[str, str] | api_errors.ApiError
        try:
            facts = await self._admit_or_raise(method=method, path=path, headers=headers, body=body)
        except api_errors.ApiError as error:
            metrics.check_decisions.labels(error.code).inc()
            outcome = error
        except Exception:
            logger.exception("Check failed")
            metrics.check_decisions.labels("internal_error").inc()
            outcome = api_errors.BILLING_UNAVAILABLE
        else:
            metrics.check_decisions.labels("allowed").inc()
            outcome = {
                contract.metadata_header(field): contract.metadata_value(value)
                for field, value in facts.items()
            }
        metrics.check_duration_seconds.observe(time.perf_counter() - started)
        return outcome

    async def close(self) -> None:
        await self._holds.close()

    async def _admit_or_raise(
        self, *, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> dict[str, Any]:
        """Dynamic metadata for an admitted request; raises :class:`ApiError` to deny it.

        The cheap refusals come first: an endpoint outside the table and a bad key cost nothing
        to refuse, before the body (up to 4 MiB) is parsed.
        """
        endpoint = self._endpoints.find(method, path)
        if endpoint is None:
            raise api_errors.ApiError(
                404,
                "endpoint_not_supported",
                f"{method} {path.split('?', 1)[0]} is not an endpoint this gateway meters.",
            )
        key = await self._keys.authenticate(_client_key(headers))
        base = {"wallet_id": key.wallet_id, "key_id": key.id}
        if endpoint.usage_format is None or endpoint.read is None:
            return base  # listing models costs nothing: no hold, nothing to settle
        empty = self._empty_wallets.get(key.wallet_id)
        if empty is not None and self._clock() < empty[0]:
            # Refused as empty a moment ago: refuse again before parsing (a 4 MiB body costs
            # tens of milliseconds of the event loop every other wallet shares).
            raise api_errors.insufficient_funds(
                self._top_up_url, money.format_usd(empty[1]), reason="wallet_empty"
            )

        request = request_body(headers.get("content-type"), body)
        model = request.get("model")
        if not isinstance(model, str) or not model:
            raise api_errors.ApiError(
                400, "model_required", 'The request body must be JSON with a "model" string.'
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
        try:
            worst = endpoint.read(request, price.max_output_tokens)
        except endpoints.RequestRefused as refused:
            raise api_errors.ApiError(
                400, refused.code, refused.message, extra={"param": refused.param} if refused.param else {}
            ) from None
        unpriced = price.unpriced_for(worst.dimensions)
        if unpriced is not None:
            raise api_errors.ApiError(
                400,
                "model_not_priced",
                f"The model {model!r} has a cost this gateway does not price ({unpriced}), so this "
                "request cannot be billed exactly.",
                extra={"param": "model", "dimension": unpriced},
            )
        if worst.output_unbounded is not None:
            raise api_errors.ApiError(
                400,
                "output_limit_required",
                f"The model {model!r} has no known output limit on this gateway, so the request must "
                f"set {worst.output_unbounded}: its hold has to cover the whole answer.",
                extra={"param": worst.output_unbounded},
            )
        prompt_tokens, amount = worst_case_nano(self._prices, price, worst, len(body))

        request_id = headers.get("x-request-id")
        if not request_id:
            # Envoy always sets it with the rendered config; without it nothing could be settled.
            raise api_errors.ApiError(503, "no_request_id", "The gateway is misconfigured.", "api_error")
        # Before the statement that may find the wallet empty begins (it waits for a batch): the
        # memo counts from here, so it never outlives a top-up committed meanwhile by a full TTL.
        asked_at = self._clock()
        refusal = await self._holds.submit(
            hold_batches.HoldRequest(request_id, key.wallet_id, key.id, model, amount, limited=key.limited)
        )
        if refusal is None:
            facts = {**base, "hold_id": request_id, "model": model, "format": endpoint.usage_format.value}
            if worst.stream_usage:
                facts["stream_usage"] = "1"
            return facts
        reason = holds.RefusalReason
        if refusal.reason is reason.FUNDS_RESERVED:
            raise api_errors.funds_reserved(retry_after_s=1)
        if refusal.reason is reason.WALLET_SUSPENDED:
            raise api_errors.wallet_suspended()
        if refusal.reason is reason.PAYMENT_DISPUTED:
            raise api_errors.payment_disputed()
        if refusal.reason is reason.WALLET_NOT_FOUND:
            raise api_errors.wallet_not_found()
        if refusal.reason is reason.KEY_LIMIT_REACHED:
            assert refusal.key_limit is not None, refusal
            self._remember_limit_refusal(refusal.key_limit)
            raise api_errors.key_limit_reached(refusal.key_limit, amount)
        if refusal.reason is reason.DUPLICATE_REQUEST:
            raise api_errors.ApiError(409, "duplicate_request", "This request id was already used.")
        assert refusal.reason is reason.INSUFFICIENT_FUNDS, refusal
        error = self._insufficient_funds(refusal, amount, price, prompt_tokens, worst)
        if error.extra.get("reason") == "wallet_empty":
            self._remember_empty(key.wallet_id, refusal.balance_nano, asked_at)
        raise error

    def _remember_limit_refusal(self, limit: key_limits.KeyLimit) -> None:
        occurrence = (limit.key_id, key_limits.iso(limit.window_start))
        if occurrence in self.limit_alerted or occurrence in self.limit_refusals:
            return
        if len(self.limit_refusals) < LIMIT_REFUSALS_MAX:
            self.limit_refusals[occurrence] = limit

    def _remember_empty(self, wallet_id: str, balance_nano: int, asked_at: float) -> None:
        """Refuse this wallet's next requests unparsed for one key-cache period from ``asked_at``,
        when the refusing statement had not yet begun: a top-up is seen as late as a key change
        is (key_lookup.py counts from the start of its query too), however slow the statement."""
        if len(self._empty_wallets) >= EMPTY_WALLETS_MAX:
            now = self._clock()
            self._empty_wallets = {w: e for w, e in self._empty_wallets.items() if e[0] > now}
            if len(self._empty_wallets) >= EMPTY_WALLETS_MAX:
                self._empty_wallets.clear()
        self._empty_wallets[wallet_id] = (
            asked_at + self._settings.key_cache_ttl_ms / 1000,
            balance_nano,
        )

    def _insufficient_funds(
        self,
        refusal: holds.Refusal,
        amount: int,
        price: pricing.ModelPrice,
        prompt_tokens: int,
        worst: endpoints.WorstCase,
    ) -> api_errors.ApiError:
        """The journey's 403, made actionable: is the wallet empty or this request too large, what
        it may cost at worst, and the largest max_tokens that would fit what is left."""
        limit = refusal.overdraft_limit_nano
        room = refusal.balance_nano - refusal.reserved_nano + limit
        empty = refusal.shortfall is not holds.Shortfall.REQUEST_TOO_LARGE
        # Sending the answer's max_tokens lengthens the body, and so the prompt's bound, by a few
        # bytes: leave room for them, so a request that follows the advice is admitted.
        fits = (
            0
            if empty
            else self._prices.output_within(
                price,
                room,
                prompt_tokens=prompt_tokens + OUTPUT_FIELD_BYTES,
                choices=worst.choices,
                dimensions=worst.dimensions,
            )
        )
        return api_errors.insufficient_funds(
            self._top_up_url,
            money.format_usd(refusal.balance_nano),
            reason=(holds.Shortfall.WALLET_EMPTY if empty else holds.Shortfall.REQUEST_TOO_LARGE).value,
            worst_case_usd=money.format_usd(amount),
            available_usd=money.format_usd(refusal.balance_nano - refusal.reserved_nano),
            overdraft_limit_usd=money.format_usd(limit),
            max_tokens_that_fit=fits,
        )


def worst_case_nano(
    prices: pricing.PriceBook, price: pricing.ModelPrice, worst: endpoints.WorstCase, body_bytes: int
) -> tuple[int, int]:
    """(the prompt's token bound, the hold in nano-USD) of a request: docs/pricing.md, "Holds".

    A function of its own, not the Decider's, so that a client can compute what its request is
    held for the way the Check does (bench/books.py checks the charges of a fault run against it).

    The prompt bound is one token per body byte plus what the provider adds for tools, never more
    than the model's context window; the whole window when the prompt references content whose
    tokens are not its bytes (images, files).
    """
    window = price.max_input_tokens
    if worst.prompt_in_body:
        bound = pricing.prompt_tokens_bound(body_bytes) + worst.prompt_overhead
        prompt_tokens = bound if window is None else min(bound, window)
    elif window is None:
        raise api_errors.ApiError(
            400,
            "model_not_priced",
            f"The model {price.model!r} has no known context window, so a request with images or "
            "files cannot be bounded before it is served; send text only.",
            extra={"param": "model", "dimension": "max_input_tokens"},
        )
    else:
        prompt_tokens = window
    amount = prices.hold_nano(
        price, prompt_tokens=prompt_tokens, max_output_tokens=worst.output_tokens, dimensions=worst.dimensions
    )
    return prompt_tokens, amount


def _client_key(headers: dict[str, str]) -> str | None:
    """The client's key: ``Authorization: Bearer …`` (OpenAI SDKs) or ``x-api-key`` (Anthropic's)."""
    authorization = headers.get("authorization")
    if authorization:
        return authorization
    api_key = headers.get("x-api-key")
    return f"Bearer {api_key}" if api_key else None


# Nesting deeper than this is no LLM request; the Lua filter walks the same body.
JSON_DEPTH_MAX = 64


def request_body(content_type: str | None, body: bytes) -> dict[str, Any]:
    """The body as the backend will read it, decided once (docs/decisions/0001): JSON, UTF-8
    without a byte-order mark, an object, no duplicate keys (a backend keeping the first of two
    "model" keys would serve a model other than the one billed), no NaN, at most
    :data:`JSON_DEPTH_MAX` deep. Anything else is refused before any hold, so the Check, the
    Lua filter and the backend never read one body three ways."""
    media_type, _, parameters = (content_type or "").partition(";")
    charset = parameters.strip().lower().replace(" ", "")
    if media_type.strip().lower() != "application/json" or charset not in ("", "charset=utf-8"):
        raise api_errors.ApiError(
            415,
            "unsupported_media_type",
            "Send the request body as JSON with 'Content-Type: application/json' (UTF-8).",
        )
    if body.startswith(b"\xef\xbb\xbf"):
        raise api_errors.ApiError(
            400, "invalid_json", "The request body must be UTF-8 JSON without a byte-order mark."
        )
    try:
        request = json.loads(
            body.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant
        )
    except _DuplicateKey as duplicate:
        raise api_errors.ApiError(
            400, "duplicate_key", f"The key {duplicate.args[0]!r} appears twice in one object."
        ) from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        request = None
    if not isinstance(request, dict) or not _shallow(request):
        raise api_errors.ApiError(
            400,
            "invalid_json",
            'The request body must be a UTF-8 JSON object with a "model", '
            f"nested at most {JSON_DEPTH_MAX} deep.",
        )
    return request


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _DuplicateKey(name)
            seen.add(name)
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _shallow(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > JSON_DEPTH_MAX:
            return False
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return True
