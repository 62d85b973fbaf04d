"""A local Stripe test double — TEST MODE, loopback only, no real money.

:mod:`.model` is the fake account that tests drive (sessions, customers and their saved cards,
payment and setup intents, charges, refunds, disputes, Stripe's test cards, the events each change
sends, webhook signatures); :mod:`.server` serves it: the Stripe API calls the gateway makes, the
checkout page, webhook delivery, and ``main()`` (``python -m billingproxy.devstack.stripe_double``).
"""

from billingproxy.devstack.stripe_double.server import StripeDouble

__all__ = ["StripeDouble"]
