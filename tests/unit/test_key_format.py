"""billing.key_format: the key format, its checksum, the stored hash and random ids."""

from __future__ import annotations

import hashlib
import string
import zlib

import pytest

from billing import key_format

# Written out here rather than taken from the module, so a change of the format fails a test.
PREFIX = "sk-litellm-"
BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
KEY_LENGTH = len(PREFIX) + 32 + 6  # 49


def checksum(body: str) -> str:
    """The documented checksum: CRC32 of the body, as 6 base62 digits, most significant first."""
    number = zlib.crc32(body.encode("utf-8"))
    digits = ""
    for _ in range(6):
        number, digit = divmod(number, 62)
        digits = BASE62[digit] + digits
    assert number == 0, "a CRC32 always fits six base62 digits (62**6 > 2**32)"
    return digits


def test_generated_key_has_the_documented_shape() -> None:
    issued = key_format.generate()
    key = issued.plaintext
    assert len(key) == KEY_LENGTH == 49
    assert key.startswith(PREFIX)
    body, check = key[len(PREFIX) : -6], key[-6:]
    assert len(body) == 32
    assert set(body) <= set(BASE62)
    assert check == checksum(body)
    assert key_format.is_well_formed(key)


def test_stored_hash_is_sha256_of_the_plaintext() -> None:
    issued = key_format.generate()
    assert issued.key_hash == hashlib.sha256(issued.plaintext.encode("ascii")).digest()
    assert len(issued.key_hash) == 32
    assert key_format.hash_key(issued.plaintext) == issued.key_hash
    assert key_format.hashes_match(issued.key_hash, key_format.hash_key(issued.plaintext))
    assert not key_format.hashes_match(issued.key_hash, key_format.hash_key(key_format.generate().plaintext))


def test_display_prefix_shows_six_characters_of_the_body_and_no_more() -> None:
    issued = key_format.generate()
    assert issued.display_prefix == issued.plaintext[: len(PREFIX) + 6]
    assert key_format.display_prefix(issued.plaintext) == issued.display_prefix


def test_key_id_is_a_random_public_id() -> None:
    issued = key_format.generate()
    assert issued.key_id.startswith("key_")
    assert len(issued.key_id) == len("key_") + 20
    assert set(issued.key_id[4:]) <= set(BASE62)
    # The id is not derived from the secret.
    assert issued.key_id[4:] not in issued.plaintext


def test_generated_keys_and_ids_do_not_repeat() -> None:
    issued = [key_format.generate() for _ in range(500)]
    assert len({k.plaintext for k in issued}) == 500
    assert len({k.key_hash for k in issued}) == 500
    assert len({k.key_id for k in issued}) == 500


def test_generated_bodies_use_the_whole_alphabet() -> None:
    # 500 × 32 draws from 62 characters: every character appears (a miss has odds ~1e-108).
    seen = set()
    for _ in range(500):
        seen.update(key_format.generate().plaintext[len(PREFIX) : -6])
    assert seen == set(BASE62)


@pytest.mark.parametrize("seed_key", range(3))
def test_every_single_character_change_is_refused(seed_key: int) -> None:
    key = key_format.generate().plaintext
    changed = 0
    for position in range(len(PREFIX), len(key)):
        for replacement in BASE62:
            if replacement == key[position]:
                continue
            candidate = key[:position] + replacement + key[position + 1 :]
            assert not key_format.is_well_formed(candidate), (position, replacement)
            changed += 1
    assert changed == 38 * 61


def test_swapping_two_adjacent_body_characters_is_refused() -> None:
    key = key_format.generate().plaintext
    for i in range(len(PREFIX), len(key) - 7):
        if key[i] != key[i + 1]:
            swapped = key[:i] + key[i + 1] + key[i] + key[i + 2 :]
            assert not key_format.is_well_formed(swapped), i


def well_formed_from(body: str, prefix: str = PREFIX) -> str:
    return prefix + body + checksum(body)


def test_a_key_built_independently_is_well_formed() -> None:
    assert key_format.is_well_formed(well_formed_from("A" * 32))
    assert key_format.is_well_formed(well_formed_from(BASE62[:32]))


@pytest.mark.parametrize(
    "prefix",
    ["sk-litelln-", "SK-LITELLM-", "sk_litellm_", "xx-litellm-", "sk-openai--"],
)
def test_wrong_prefix_is_refused_even_with_a_valid_checksum(prefix: str) -> None:
    assert len(prefix) == len(PREFIX)
    assert not key_format.is_well_formed(well_formed_from("a" * 32, prefix=prefix))


def test_wrong_length_is_refused() -> None:
    key = key_format.generate().plaintext
    assert not key_format.is_well_formed(key[:-1])
    assert not key_format.is_well_formed(key + "0")
    assert not key_format.is_well_formed(key + "\n")
    assert not key_format.is_well_formed(" " + key)
    assert not key_format.is_well_formed("")
    assert not key_format.is_well_formed(PREFIX)
    # A longer body with its own valid checksum is still the wrong shape.
    assert not key_format.is_well_formed(well_formed_from("a" * 33))
    assert not key_format.is_well_formed(well_formed_from("a" * 31))


@pytest.mark.parametrize("bad", ["-", "_", "+", "/", "=", " ", "é", "\x00", "٣"])
def test_characters_outside_base62_are_refused_even_with_a_valid_checksum(bad: str) -> None:
    body = bad + "a" * 31
    assert not key_format.is_well_formed(well_formed_from(body))


def test_random_id_shape() -> None:
    assert key_format.random_id("wal_").startswith("wal_")
    assert len(key_format.random_id("wal_")) == 24
    assert len(key_format.random_id("x", length=5)) == 6
    many = {key_format.random_id("wal_") for _ in range(1000)}
    assert len(many) == 1000
    assert all(set(i[4:]) <= set(BASE62) for i in many)
