"""The API key format: ``sk-litellm-`` + 32 random base62 characters + a 6-character CRC32 checksum.

Why ``sk-litellm-``: the keys look like a LiteLLM proxy's, which clients and tools set up for
LiteLLM (the backend this gateway most often fronts) expect; a key from this gateway drops into
them unchanged. Changing the prefix would also refuse every key already issued. Key rows
(issuing, finding, revoking) live in :mod:`billing.api_keys`.

Why a checksum: a typo or a scanner's guess is refused by arithmetic alone, before any database
look-up, so garbage keys cost nothing. Why SHA-256 and not a slow hash: the key carries ~190
bits of randomness, so there is nothing to brute-force; a fast hash keeps the Check fast. Only
the hash is stored; the plaintext is shown once, at issue time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets as _secrets  # stdlib; aliased so the name never reads like a module of ours
import zlib

PREFIX = "sk-litellm-"
BODY_LENGTH = 32
CHECKSUM_LENGTH = 6
ID_PREFIX = "key_"
KEY_LENGTH = len(PREFIX) + BODY_LENGTH + CHECKSUM_LENGTH
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE62_SET = frozenset(BASE62)


@dataclasses.dataclass(frozen=True)
class IssuedKey:
    """A freshly generated key: ``plaintext`` goes to the user once, the rest is stored."""

    plaintext: str
    key_hash: bytes
    display_prefix: str
    key_id: str


def _base62(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        chars.append(BASE62[digit])
    return "".join(reversed(chars))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def random_id(prefix: str, length: int = 20) -> str:
    """A random public identifier such as ``wal_…`` or ``key_…`` (not a secret)."""
    return prefix + "".join(_secrets.choice(BASE62) for _ in range(length))


def generate() -> IssuedKey:
    body = "".join(_secrets.choice(BASE62) for _ in range(BODY_LENGTH))
    plaintext = PREFIX + body + _checksum(body)
    return IssuedKey(
        plaintext=plaintext,
        key_hash=hash_key(plaintext),
        display_prefix=display_prefix(plaintext),
        key_id=random_id(ID_PREFIX),
    )


def is_well_formed(plaintext: str) -> bool:
    """Shape and checksum only: True does not mean the key exists."""
    if len(plaintext) != KEY_LENGTH or not plaintext.startswith(PREFIX):
        return False
    rest = plaintext[len(PREFIX) :]
    if not _BASE62_SET.issuperset(rest):
        return False
    body, check = rest[:BODY_LENGTH], rest[BODY_LENGTH:]
    return hmac.compare_digest(_checksum(body), check)


def hash_key(plaintext: str) -> bytes:
    return hashlib.sha256(plaintext.encode("utf-8")).digest()


def hashes_match(stored: bytes, presented: bytes) -> bool:
    return hmac.compare_digest(stored, presented)


def display_prefix(plaintext: str) -> str:
    """The part safe to show in listings and Kubernetes status: enough to tell keys apart."""
    return plaintext[: len(PREFIX) + 6]
