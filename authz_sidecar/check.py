"""Envoy's ext_authz ``Check``: key → model price → hold → allow, or an OpenAI-shaped denial.

A denial is a normal ``CheckResponse`` carrying the HTTP status and JSON body the client sees,
never a gRPC error (Envoy runs this filter fail-closed, so an error would read as a 403 with no
explanation). On allow, the client's key is removed and the backend's credential set, and the
wallet, key and hold ids travel to the access log as dynamic metadata.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2

from authz_sidecar import api_errors, metrics
from authz_sidecar.group_commit import GroupCommit
from authz_sidecar.key_lookup import KeyLookup
from billing import database, holds, money, pricing
from billing.settings import Settings

logger = logging.getLogger(__name__)

# The namespace Envoy files ext_authz dynamic metadata under; the access log reads it there.
METADATA_NAMESPACE = "envoy.filters.http.ext_authz"
# Output-token fields a client may set, newest name first (OpenAI renamed max_tokens).
_MAX_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_FREE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Holds are placed by at most HOLD_LANES transactions at once (pool connections they may take);
# Checks arriving meanwhile go together in the next one.
HOLD_LANES = 4
HOLD_BATCH_MAX = 64
_OVERWRITE = base_pb2.HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD


class Decider:
    """The decision, separate from the protobuf plumbing so it reads as the billing rule it is."""

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
            self._place_holds, lanes=HOLD_LANES, batch_max=HOLD_BATCH_MAX
        )

    async def _place_holds(self, batch: list[holds.HoldRequest]) -> list[holds.Admission | holds.Refusal]:
        async with database.acquire(self._db) as conn:
            return await holds.place_many(
                conn, batch, ttl_s=self._settings.hold_ttl_s, strict=self._settings.strict
            )

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
            return {**base, "hold_id": request_id, "model": model}
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


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):
    """The gRPC face of :class:`Decider`."""

    def __init__(self, decider: Decider, backend_api_key: str) -> None:
        self._decider = decider
        if backend_api_key:
            swap = [
                base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key="authorization", value=f"Bearer {backend_api_key}"),
                    append_action=_OVERWRITE,
                )
            ]
            self._ok_headers, self._headers_to_remove = swap, []
        else:
            self._ok_headers, self._headers_to_remove = [], ["authorization"]

    async def Check(self, request, context):  # noqa: N802 (gRPC method name)
        started = time.perf_counter()
        http = request.attributes.request.http
        try:
            metadata = await self._decider.decide(
                method=http.method,
                path=http.path,
                headers=dict(http.headers),
                body=http.raw_body or http.body.encode(),
            )
        except api_errors.ApiError as error:
            metrics.check_decisions.labels(error.code).inc()
            response = _denied(error)
        except Exception:
            # Fail closed with a clear answer; the traceback goes to our log, not to the client.
            logger.exception("Check failed")
            metrics.check_decisions.labels("internal_error").inc()
            response = _denied(
                api_errors.ApiError(503, "billing_unavailable", "Billing is unavailable; retry shortly.", "api_error")
            )
        else:
            metrics.check_decisions.labels("allowed").inc()
            response = self._allowed(metadata)
        metrics.check_seconds.observe(time.perf_counter() - started)
        return response

    def _allowed(self, metadata: dict[str, Any]) -> external_auth_pb2.CheckResponse:
        struct = struct_pb2.Struct()
        struct.update(metadata)
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=self._ok_headers, headers_to_remove=self._headers_to_remove
            ),
            dynamic_metadata=struct,
        )


def _denied(error: api_errors.ApiError) -> external_auth_pb2.CheckResponse:
    headers = [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="content-type", value="application/json"))]
    headers += [
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v)) for k, v in error.headers.items()
    ]
    grpc_code = code_pb2.UNAUTHENTICATED if error.status == 401 else code_pb2.PERMISSION_DENIED
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=grpc_code, message=error.code),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=error.status),
            headers=headers,
            body=error.body().decode(),
        ),
    )
