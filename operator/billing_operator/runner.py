"""Running the operator from Python: what ``billingproxy operator`` and the tests call.

``kopf run -m billing_operator`` needs none of this (kopf's command line takes -n/-A/--peering);
here the same choices come from :class:`operator_settings.OperatorSettings`, so one environment configures
the operator whichever way it is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading

import kopf

import billing_operator  # noqa: F401  (registers the handlers with kopf)
from billing_operator import settings as operator_settings, startup


async def run(
    cfg: operator_settings.OperatorSettings,
    *,
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
) -> None:
    """Run until ``stop_flag`` is set (or SIGINT/SIGTERM when on the main thread).

    A stop asked for with ``stop_flag`` marks the operator as stopping (``startup.Lifecycle``)
    first and only then is passed on to kopf, so that no status timer is spawned again while
    kopf winds down (see ``startup``).
    """
    lifecycle = startup.Lifecycle()
    kopf_stop: asyncio.Event | None = None
    relay: asyncio.Task[None] | None = None
    if stop_flag is not None:
        kopf_stop = asyncio.Event()
        relay = asyncio.create_task(_relay_stop(stop_flag, lifecycle, kopf_stop), name="stop-flag relay")
    try:
        await kopf.operator(
            clusterwide=not cfg.namespaces,
            namespaces=list(cfg.namespaces),
            standalone=not cfg.peering,
            peering_name=cfg.peering or None,
            priority=peering_priority() if cfg.peering else None,
            liveness_endpoint=cfg.liveness_url or None,
            memo=kopf.Memo(operator_settings=cfg, lifecycle=lifecycle),
            stop_flag=kopf_stop,
            ready_flag=ready_flag,
        )
    finally:
        if relay is not None:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay


def peering_priority() -> int:
    """This process's kopf peering priority: a random one.

    kopf pauses every operator of a peering that sees another live one of the same priority
    ("Pausing all operators, including self", kopf/_core/engines/peering.py), so replicas of one
    Deployment at kopf's default priority would all pause for good. With distinct priorities the
    highest is active and the others wait, and the next one takes over once its keep-alives stop.
    A tie among 2**31 values (both would wait until one restarts) is negligible; nothing secret
    rests on it.
    """
    return random.randrange(1, 2**31)


async def _relay_stop(
    stop_flag: threading.Event, lifecycle: startup.Lifecycle, kopf_stop: asyncio.Event
) -> None:
    loop = asyncio.get_running_loop()
    # In short waits: a worker thread blocked for good on the flag would keep the loop from closing.
    while not await loop.run_in_executor(None, stop_flag.wait, 0.1):
        pass
    lifecycle.stopping = True
    kopf_stop.set()
