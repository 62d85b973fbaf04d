"""Turning the failures a person can fix (database unreachable, port taken) into one clear line."""

from __future__ import annotations

import errno

from sqlalchemy.exc import DBAPIError, OperationalError


def explain(exc: BaseException) -> str | None:
    """A one-line explanation with the fix, or None when the error is a bug (let it raise)."""
    if isinstance(exc, (OperationalError, DBAPIError, ConnectionRefusedError)):
        return (
            f"cannot reach the database ({type(exc.__cause__ or exc).__name__}: "
            f"{str(exc.__cause__ or exc).splitlines()[0][:200]}). Is it running? Check DATABASE_URL, "
            "or start the local stack with `billingproxy up`."
        )
    if isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE,):
        return (
            f"{exc.strerror or exc}: another process uses the port; "
            "stop it or choose another port (docs/configuration.md)"
        )
    if isinstance(exc, OSError) and "cannot listen" in str(exc):
        return f"{exc}; stop the other process or choose another port (docs/configuration.md)"
    return None
