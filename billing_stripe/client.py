"""The Stripe client, built one way for every caller.

Sharp edges: with ``api_base`` set (the local test double, never with a live key: the settings
refuse that) the SDK talks to that address and never retries; against Stripe it retries twice,
which is safe because every create carries an Idempotency-Key and a retry reuses it. The client
borrows the caller's aiohttp session, which must outlive it.
"""

from __future__ import annotations

import aiohttp
import stripe

# Below Envoy's 30 s route timeout for the sidecar, so a client of the top-up route hears our
# answer, not Envoy's; the operator's reconciliation waits as long.
REQUEST_TIMEOUT_S = 20
RETRIES_MAX = 2


def make_client(*, secret_key: str, api_base: str, session: aiohttp.ClientSession) -> stripe.StripeClient:
    """A Stripe client on ``session``: Stripe itself, or the API at ``api_base`` when set."""
    return stripe.StripeClient(
        secret_key,
        base_addresses={"api": api_base} if api_base else None,
        max_network_retries=0 if api_base else RETRIES_MAX,
        http_client=stripe.AIOHTTPClient(
            session=session, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        ),
    )
