"""The failures a person can fix that arrive as some library's exception, as one clear line.

Everything the project raises for a person to fix is a ``billing.errors.UserFacingError`` and
needs no explaining. What is left: a database that cannot be reached (whatever the driver raised,
as ``billing.database.is_unreachable`` tells it) and a port taken by a listener that is not the
sidecar's (the operator's liveness endpoint).
"""

from __future__ import annotations

import errno

from billing import database


def explain(exc: BaseException) -> str | None:
    """A one-line explanation with the fix, or None when the error is a bug (let it raise)."""
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return (
            f"{exc.strerror or exc}: another process uses the port; "
            "stop it or choose another port (docs/configuration.md)"
        )
    if database.is_unreachable(exc):
        return (
            f"cannot reach the database ({type(exc.__cause__ or exc).__name__}: "
            f"{(str(exc.__cause__ or exc).splitlines() or [''])[0][:200]}). Is it running? Check "
            "DATABASE_URL, or start the local stack with `billingproxy up`."
        )
    return None
