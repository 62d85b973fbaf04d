"""An ApiError keeps its answer wherever it is raised from: a client gets its 4xx, never a 500."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from authz_sidecar.api_errors import ApiError


@contextlib.asynccontextmanager
async def a_transaction() -> AsyncIterator[None]:
    """Stands in for ``engine.begin()``: contextlib writes the leaving exception's traceback."""
    yield


async def test_an_api_error_leaves_an_async_with_block_unchanged() -> None:
    refusal = ApiError(404, "key_not_found", "No such key.")
    with pytest.raises(ApiError) as raised:
        async with a_transaction():
            raise refusal
    assert raised.value is refusal
    assert (raised.value.status, raised.value.code) == (404, "key_not_found")


def test_api_errors_compare_by_identity_and_hash() -> None:
    first, second = ApiError(400, "bad", "Bad."), ApiError(400, "bad", "Bad.")
    assert first != second and len({first, second}) == 2
