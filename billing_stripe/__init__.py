"""The Stripe SDK adapter shared by the sidecar and the operator.

Why a package of its own: both talk to Stripe with the same client (the sidecar creates Checkout
Sessions, the operator retrieves them to reconcile), the core (``billing``) may not import the
Stripe SDK, and the sidecar and the operator may not import each other. So the one construction
of the client lives here, above ``billing`` and below both (import-linter's layers contract).
"""

from billing_stripe.client import make_client

__all__ = ["make_client"]
