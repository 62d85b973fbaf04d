"""Running the operator from Python: what ``billingproxy operator`` and the tests call.

``kopf run -m billing_operator`` needs none of this (kopf's command line takes -n/-A/--peering);
here the same choices come from :class:`config.OperatorConfig`, so one environment configures
the operator whichever way it is started.
"""

from __future__ import annotations

import threading

import kopf

import billing_operator  # noqa: F401  (registers the handlers with kopf)
from billing_operator import config


async def run(
    cfg: config.OperatorConfig,
    *,
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
) -> None:
    """Run until ``stop_flag`` is set (or SIGINT/SIGTERM when on the main thread)."""
    await kopf.operator(
        clusterwide=not cfg.namespaces,
        namespaces=list(cfg.namespaces),
        standalone=not cfg.peering,
        peering_name=cfg.peering or None,
        liveness_endpoint=cfg.liveness_url or None,
        memo=kopf.Memo(operator_config=cfg),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
