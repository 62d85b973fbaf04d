"""The kinds of failure every layer shares, as bases to catch by kind rather than by list.

- :class:`UserFacingError`: a person fixes it (a setting, a URL, a price file, a port, a wallet
  that does not exist), and its message says how. The ``billingproxy`` command ends with that
  one line and exit status 2, never a traceback; errors of this kind are raised in the core and
  in every layer above it, so the base lives here, below all of them.
- :class:`Conflict`: a change disagrees with rows already there (an address that has a wallet,
  a key id stored with another hash, a row another owner holds). The caller answers it (409, a
  condition on a resource); retrying the same change cannot succeed.

A database that cannot be reached is neither: it is told apart from bugs by
:func:`billing.database.is_unreachable`, because drivers raise it as their own types.
"""

from __future__ import annotations


class UserFacingError(Exception):
    """A failure whose message tells a person what to fix."""


class Conflict(Exception):
    """A change that contradicts what is already stored."""
