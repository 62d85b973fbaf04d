"""`billingproxy operator`: the Kubernetes operator, configured from the environment.

Equivalent to ``kopf run -m billing_operator`` with the namespaces, peering and liveness
endpoint taken from ``BILLINGPROXY_OPERATOR_*`` (docs/operator.md) instead of kopf's flags.
Stops on SIGINT/SIGTERM. Bad settings end with one line on stderr and status 2.
"""

from __future__ import annotations

import asyncio
import sys

from billing import settings as settings_mod
from billing_operator import runner, settings as operator_settings


def main(settings: settings_mod.Settings) -> int:
    try:
        cfg = operator_settings.from_env(settings=settings)
    except settings_mod.SettingsError as exc:
        print(f"billingproxy: {exc}", file=sys.stderr)
        return 2
    asyncio.run(runner.run(cfg))
    return 0
