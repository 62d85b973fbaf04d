"""Why an object could not be reconciled, as typed errors that know their condition and retry.

The work functions of the reconcilers raise these and nothing kopf-specific; one place
(:func:`billing_operator.status.reconciling`) writes the matching condition on the object and
turns them into kopf's errors: :class:`kopf.PermanentError` for a spec that can never work as
written (kopf stops retrying until the spec changes), :class:`kopf.TemporaryError` for what time
can fix (PostgreSQL or the API being away, a Wallet not created yet).

Messages end up in conditions, Events and logs: they never carry a key's plaintext.
"""

from __future__ import annotations


class ReconcileError(Exception):
    # The condition's ``reason`` (CamelCase, as Kubernetes conventions ask).
    reason = "Error"
    # True: retrying cannot help until the spec changes.
    permanent = False

    def __init__(self, message: str, *, reason: str | None = None, delay_s: float | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        # None: the operator's retry delay (BILLINGPROXY_OPERATOR_RETRY_DELAY_S).
        self.delay_s = delay_s

    @property
    def message(self) -> str:
        return str(self)


class InvalidSpec(ReconcileError):
    """The spec passed the CRD's schema (or the CRD is older) but cannot be honoured."""

    reason = "InvalidSpec"
    permanent = True


class NotOwned(ReconcileError):
    """The database row this object maps to belongs to someone else: never touched."""

    reason = "NotOwned"
    permanent = True


class Waiting(ReconcileError):
    """Something this object needs is not there yet (a Wallet, a free Secret name)."""

    reason = "Waiting"


class DatabaseUnavailable(ReconcileError):
    reason = "DatabaseUnavailable"


class KubernetesUnavailable(ReconcileError):
    reason = "KubernetesApiError"
