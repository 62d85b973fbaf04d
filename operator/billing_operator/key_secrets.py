"""The Secret that carries an ApiKey's plaintext: how it is built and read back. No I/O.

The Secret is the only place the plaintext ever lives (PostgreSQL keeps the SHA-256). That makes
it the source of truth for *which* key an ApiKey currently hands out: the operator writes the
Secret first and records the key in PostgreSQL second, and on every run re-derives the row from
the Secret. A crash between the two steps therefore never loses a key nor issues a second one.

Layout (``type: Opaque``): data ``api-key`` (the key) and ``key-id`` (``key_…``); labels naming
the operator, the ApiKey and the Wallet; the annotation ``billingproxy.io/rotation-generation``
saying which ``spec.rotationGeneration`` the key answers; an owner reference to the ApiKey.

(Not named ``secrets.py``: that would shadow the standard library's ``secrets``.)
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping
from typing import Any

import kopf

from billing import key_format

DATA_API_KEY = "api-key"
DATA_KEY_ID = "key-id"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "billingproxy-operator"
LABEL_APIKEY = "billingproxy.io/apikey"
LABEL_WALLET = "billingproxy.io/wallet"
ANNOTATION_GENERATION = "billingproxy.io/rotation-generation"


@dataclasses.dataclass(frozen=True)
class StoredKey:
    """What a Secret of ours holds. ``issued`` is None when the data is damaged."""

    issued: key_format.IssuedKey | None
    generation: int | None

    def __repr__(self) -> str:  # the default repr would print the plaintext
        key_id = self.issued.key_id if self.issued else None
        return f"StoredKey(key_id={key_id!r}, generation={self.generation!r})"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("ascii")).decode("ascii")


def build(
    *,
    owner: kopf.Body,
    secret_name: str,
    wallet_name: str,
    issued: key_format.IssuedKey,
    generation: int,
) -> dict[str, Any]:
    """The whole Secret for a create, owned by the ApiKey ``owner`` (its body)."""
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name,
            "namespace": owner["metadata"]["namespace"],
            "labels": labels(owner, wallet_name),
            "annotations": {ANNOTATION_GENERATION: str(generation)},
        },
        "data": data(issued),
    }
    kopf.append_owner_reference(body, owner=owner, controller=True, block_owner_deletion=True)
    return body


def labels(owner: Mapping[str, Any], wallet_name: str) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_APIKEY: owner["metadata"]["name"],
        LABEL_WALLET: wallet_name,
    }


def data(issued: key_format.IssuedKey) -> dict[str, str]:
    return {DATA_API_KEY: _b64(issued.plaintext), DATA_KEY_ID: _b64(issued.key_id)}


def rotation_patch(
    *, owner: Mapping[str, Any], wallet_name: str, issued: key_format.IssuedKey, generation: int
) -> dict[str, Any]:
    """A merge patch that puts a new key into an existing Secret of ours."""
    return {
        "metadata": {
            "labels": labels(owner, wallet_name),
            "annotations": {ANNOTATION_GENERATION: str(generation)},
        },
        "data": data(issued),
    }


def owner_uid(secret: Mapping[str, Any]) -> str | None:
    """The UID of the ApiKey that controls this Secret, if an ApiKey does."""
    for ref in secret.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "ApiKey" and ref.get("apiVersion", "").startswith("billingproxy.io/"):
            uid: str | None = ref.get("uid")
            return uid
    return None


def is_managed(secret: Mapping[str, Any]) -> bool:
    return (secret.get("metadata", {}).get("labels") or {}).get(LABEL_MANAGED_BY) == MANAGED_BY


def read(secret: Mapping[str, Any]) -> StoredKey:
    raw = secret.get("data") or {}
    annotations = secret.get("metadata", {}).get("annotations") or {}
    try:
        generation: int | None = int(annotations.get(ANNOTATION_GENERATION, ""))
    except ValueError:
        generation = None
    try:
        plaintext = base64.b64decode(raw.get(DATA_API_KEY, ""), validate=True).decode("ascii")
        key_id = base64.b64decode(raw.get(DATA_KEY_ID, ""), validate=True).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return StoredKey(issued=None, generation=generation)
    if not key_format.is_well_formed(plaintext) or not key_id.startswith(key_format.ID_PREFIX):
        return StoredKey(issued=None, generation=generation)
    issued = key_format.IssuedKey(
        plaintext=plaintext,
        key_hash=key_format.hash_key(plaintext),
        display_prefix=key_format.display_prefix(plaintext),
        key_id=key_id,
    )
    return StoredKey(issued=issued, generation=generation)
