"""The Kubernetes API beyond kopf's own calls: logging in, and reading and writing key Secrets.

Why the official client and not kopf's internals: kopf has no public API for arbitrary objects.
The client is synchronous, so every call runs in a worker thread with a bounded timeout.

Why our own login handler instead of kopf's default: kopf's ``login_via_client`` reads
``$KUBECONFIG`` once, when the ``kubernetes`` package is imported; this one reads it when the
operator logs in, and hands kopf and the Secrets client the same credentials (in-cluster service
account first, then kubeconfig), so the two can never talk to different clusters.

Sharp edge: Secret bodies carry keys. Nothing here logs a body or a client model (their reprs
include ``data``); errors are reported by HTTP status and reason only.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any, cast

import kopf
import kubernetes
import urllib3

from billing_operator import errors

MERGE_PATCH = "application/merge-patch+json"


class AlreadyExists(Exception):
    pass


def load_configuration() -> kubernetes.client.Configuration:
    """In-cluster service account if there is one, else ``$KUBECONFIG`` / ``~/.kube/config``."""
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        try:
            kubernetes.config.load_kube_config(
                config_file=os.environ.get("KUBECONFIG") or None, client_configuration=config
            )
        except (kubernetes.config.ConfigException, OSError) as exc:
            raise kopf.LoginError(
                f"no Kubernetes credentials: not in a cluster, and no usable kubeconfig ({exc})"
            ) from None
    return config


def connection_info(config: kubernetes.client.Configuration) -> kopf.ConnectionInfo:
    """The same credentials, in kopf's terms."""
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (
        (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    )
    return kopf.ConnectionInfo(
        server=config.host,
        ca_path=config.ssl_ca_cert,
        insecure=not config.verify_ssl,
        username=config.username or None,
        password=config.password or None,
        scheme=scheme,
        token=token,
        certificate_path=config.cert_file,
        private_key_path=config.key_file,
    )


def _unavailable(what: str, exc: BaseException) -> errors.ReconcileError:
    if isinstance(exc, kubernetes.client.ApiException):
        if exc.status == 403:
            return errors.ReconcileError(
                f"{what}: forbidden (HTTP 403); give the operator's service account the RBAC of "
                "operator/deploy/rbac.yaml",
                reason="Forbidden",
            )
        return errors.KubernetesUnavailable(f"{what}: HTTP {exc.status} {exc.reason or ''}".rstrip())
    return errors.KubernetesUnavailable(f"{what}: {type(exc).__name__}")


class Secrets:
    """Get, create, merge-patch and delete Secrets; answers are plain dicts."""

    def __init__(self, config: kubernetes.client.Configuration, *, timeout_s: float) -> None:
        self._api = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(config))
        self._timeout_s = timeout_s

    @staticmethod
    def _json(response: object) -> dict[str, Any]:
        """The body of a call made with ``_preload_content=False``, which returns the raw urllib3
        response, not the model the client's annotations name."""
        body: dict[str, Any] = json.loads(cast(urllib3.HTTPResponse, response).data)
        return body

    async def read(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            response = await asyncio.to_thread(
                self._api.read_namespaced_secret,
                name,
                namespace,
                _preload_content=False,
                _request_timeout=self._timeout_s,
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise _unavailable(f"reading Secret {namespace}/{name}", exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _unavailable(f"reading Secret {namespace}/{name}", exc) from None
        return self._json(response)

    async def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        name = body["metadata"]["name"]
        try:
            response = await asyncio.to_thread(
                self._api.create_namespaced_secret,
                namespace,
                body,  # type: ignore[arg-type]  # the client takes a dict for V1Secret
                _preload_content=False,
                _request_timeout=self._timeout_s,
            )
        except kubernetes.client.ApiException as exc:
            if exc.status == 409:
                raise AlreadyExists(f"Secret {namespace}/{name}") from None
            raise _unavailable(f"creating Secret {namespace}/{name}", exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _unavailable(f"creating Secret {namespace}/{name}", exc) from None
        return self._json(response)

    async def patch(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await asyncio.to_thread(
                self._api.patch_namespaced_secret,
                name,
                namespace,
                body,
                _content_type=MERGE_PATCH,
                _preload_content=False,
                _request_timeout=self._timeout_s,
            )
        except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise _unavailable(f"updating Secret {namespace}/{name}", exc) from None
        return self._json(response)

    async def delete(self, namespace: str, name: str, *, uid: str) -> bool:
        """Delete this very Secret (``uid`` precondition: never a same-named successor)."""
        delete_options = {"preconditions": {"uid": uid}}
        try:
            await asyncio.to_thread(
                self._api.delete_namespaced_secret,
                name,
                namespace,
                body=delete_options,  # type: ignore[arg-type]  # the client takes a dict for V1DeleteOptions
                _preload_content=False,
                _request_timeout=self._timeout_s,
            )
        except kubernetes.client.ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise _unavailable(f"deleting Secret {namespace}/{name}", exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _unavailable(f"deleting Secret {namespace}/{name}", exc) from None
        return True
