"""The kopf operator: Wallet and ApiKey resources reconciled into PostgreSQL and key Secrets.

Run it with ``kopf run -m billing_operator --all-namespaces`` or ``billingproxy operator``.
Importing this package registers the handlers with kopf's default registry:

- :mod:`wallet_reconciler`: Wallet → wallet row (grant once, per UID); deletion suspends it;
- :mod:`apikey_reconciler`: ApiKey → key Secret + hash in PostgreSQL; rotation; revocation;
- :mod:`status_mirror`: timers copying balances and key states into ``.status``, with Events;
- :mod:`startup`: kopf settings, login, the database pool, and (with Stripe configured)
  :mod:`stripe_reconciler`, which credits paid Checkout Sessions whose webhook never came.

See ``docs/operator.md`` for the resources, conditions and design decisions.
"""

from billing_operator import apikey_reconciler, startup, status_mirror, wallet_reconciler

__all__ = ["apikey_reconciler", "startup", "status_mirror", "wallet_reconciler"]
