"""Envoy's ext_authz over gRPC: the ``Check`` of ``envoy.service.auth.v3.Authorization``.

ext_authz's gRPC flavour, kept beside the HTTP one (check_http.py) and chosen in Envoy's
configuration (``BILLINGPROXY_CHECK_TRANSPORT=grpc``); the sidecar serves both. It costs many
times more CPU per Check in Python (grpc.aio's own work; the figures: docs/benchmarks.md), which
is why HTTP is the default. Same rule (``check.Decider.decide``), same answers: a denial is a normal
``CheckResponse`` carrying the HTTP status and JSON body the client sees, never a gRPC error
(Envoy runs the filter fail-closed, so an error would read as a 403 with no explanation); an
admission hands the access log the same ``x-billingproxy-*`` metadata the HTTP flavour does
(the backend credential is set by Envoy's route, never by the Check: envoy_config.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from authz_sidecar import api_errors, check

if TYPE_CHECKING:
    import grpc


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]  # Envoy's generated servicer has no types
    def __init__(self, decider: check.Decider) -> None:
        self._decider = decider

    async def Check(  # noqa: N802 (gRPC method name)
        self,
        request: external_auth_pb2.CheckRequest,
        context: grpc.aio.ServicerContext[external_auth_pb2.CheckRequest, external_auth_pb2.CheckResponse],
    ) -> external_auth_pb2.CheckResponse:
        http = request.attributes.request.http
        outcome = await self._decider.decide(
            method=http.method,
            path=http.path,
            headers=dict(http.headers),
            body=http.raw_body or http.body.encode(),
        )
        if isinstance(outcome, api_errors.ApiError):
            return _denied(outcome)
        metadata = struct_pb2.Struct()
        metadata.update(outcome)
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(),
            dynamic_metadata=metadata,
        )


def _denied(error: api_errors.ApiError) -> external_auth_pb2.CheckResponse:
    headers = {"content-type": "application/json", **error.headers}
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(
            code=code_pb2.UNAUTHENTICATED if error.status == 401 else code_pb2.PERMISSION_DENIED,
            message=error.code,
        ),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=error.status),
            headers=[
                base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v))
                for k, v in headers.items()
            ],
            body=error.body().decode(),
        ),
    )
