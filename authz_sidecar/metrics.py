"""Prometheus metrics of the sidecar, served on the admin port at /metrics.

Names follow Prometheus' conventions (a counter ends in ``_total``, which prometheus_client adds;
a duration is in seconds and says ``_duration_seconds``). docs/metrics.md lists every metric,
and tests/unit/test_metrics.py keeps that page and this registry in step.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

registry = CollectorRegistry(auto_describe=True)

check_decisions = Counter(
    "billingproxy_check_decisions",
    "ext_authz Check answers, by result (allowed, or the error code of the denial).",
    ["result"],
    registry=registry,
)
check_duration_seconds = Histogram(
    "billingproxy_check_duration_seconds",
    "Time the sidecar spends answering one Check.",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=registry,
)
settlements = Counter(
    "billingproxy_settlements",
    "Access-log entries settled, by outcome (posted, voided, already_posted, …).",
    ["outcome"],
    registry=registry,
)
holds_pending = Gauge(
    "billingproxy_holds_pending",
    "Holds placed and not yet settled (read at each expiry sweep).",
    registry=registry,
)
access_log_refusals = Counter(
    "billingproxy_access_log_refusals",
    "Access-log reports refused, by reason: a stream without the access-log secret "
    "(unauthenticated), or an entry naming another wallet or model than its hold (hold_mismatch).",
    ["reason"],
    registry=registry,
)
for _reason in ("unauthenticated", "hold_mismatch"):
    access_log_refusals.labels(_reason)  # shown at 0 from the start, for alerts on any increase
settlement_failures = Counter(
    "billingproxy_settlement_failures",
    "gRPC access-log entries that could not be settled after retries (the access-log file "
    "settles them when the database answers again).",
    registry=registry,
)
access_log_file_recovered = Counter(
    "billingproxy_access_log_file_recovered",
    "Requests settled from Envoy's access-log file because the gRPC access log had not settled them.",
    registry=registry,
)
access_log_file_lag_bytes = Gauge(
    "billingproxy_access_log_file_lag_bytes",
    "Bytes of Envoy's access-log file written but not yet settled by the sidecar (read each round).",
    registry=registry,
)
access_log_file_failures = Counter(
    "billingproxy_access_log_file_failures",
    "Rounds of following the access-log file that failed (the database or the file unreachable); "
    "the next round retries from the same offset.",
    registry=registry,
)
unreported_holds_charged = Counter(
    "billingproxy_unreported_holds_charged",
    "Expired holds no access log reported within the grace period, charged their estimate.",
    registry=registry,
)

# Python's cyclic garbage collector stops the event loop, and so every Check in flight, while it
# runs. server.run freezes the start-up heap (gc.freeze) so that a full collection no longer walks
# it; these show that it worked, and what pauses are left.
gc_pause_seconds = Histogram(
    "billingproxy_gc_pause_seconds",
    "Pauses of Python's cyclic garbage collector, by generation (the event loop stops for them).",
    ["generation"],
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
    registry=registry,
)
gc_frozen_objects = Gauge(
    "billingproxy_gc_frozen_objects",
    "Objects moved out of the garbage collector's reach at start-up (gc.freeze).",
    registry=registry,
)
_gc_pauses = [gc_pause_seconds.labels(str(generation)) for generation in range(3)]
_gc_started = 0.0


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    global _gc_started  # noqa: PLW0603 (gc.callbacks calls a plain function; start and stop share this)
    if phase == "start":
        _gc_started = time.perf_counter()
    else:
        _gc_pauses[info["generation"]].observe(time.perf_counter() - _gc_started)


def watch_gc_pauses() -> None:
    """Time every collection into ``gc_pause_seconds`` (a ``gc.callbacks`` hook; idempotent)."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


def freeze_startup_heap() -> None:
    """Collect once, then move every surviving object to the permanent generation: what start-up
    built (modules, the price map, pools) lives as long as the process, and a full collection
    walking it stops the event loop for tens of milliseconds (docs/architecture.md, "The Check")."""
    gc.collect()
    gc.freeze()
    gc_frozen_objects.set(gc.get_freeze_count())


# --- Stripe top-ups and webhooks (stripe_api.py) --------------------------------------------------

stripe_webhook_events = Counter(
    "billingproxy_stripe_webhook_events",
    "Verified Stripe webhook events, by outcome "
    "(credited, already_credited, not_ours, amount_mismatch, …, duplicate).",
    ["outcome"],
    registry=registry,
)
stripe_webhook_rejections = Counter(
    "billingproxy_stripe_webhook_rejections",
    "Webhook calls refused before anything was written, by reason.",
    ["reason"],
    registry=registry,
)
stripe_checkout_sessions = Counter(
    "billingproxy_stripe_checkout_sessions",
    "Top-up Checkout Sessions requested, by result (created, or the error code).",
    ["result"],
    registry=registry,
)

# --- Alerts (alert_delivery.py; docs/alerts.md) --------------------------------------

alert_events = Counter(
    "billingproxy_alert_events",
    "Alert events this sidecar recorded, by type (wallet.balance_low: a threshold crossed; alert.test).",
    ["type"],
    registry=registry,
)
alert_events_recent = Gauge(
    "billingproxy_alert_events_recent",
    "Alert events made in the last hour by every producer (the sweep, the test endpoint, "
    "auto-recharge, key limits), by type; read from the database at each round, so every sidecar "
    "shows the same numbers.",
    ["type"],
    registry=registry,
)
alert_deliveries = Counter(
    "billingproxy_alert_deliveries",
    "Attempts to deliver an alert event, by channel (webhook, mail, kubernetes) and outcome "
    "(delivered, failed, refused_address, gave_up).",
    ["channel", "outcome"],
    registry=registry,
)
for _channel, _outcomes in (
    ("webhook", ("delivered", "failed", "refused_address", "gave_up")),
    ("mail", ("delivered", "failed", "gave_up")),
):
    for _outcome in _outcomes:
        alert_deliveries.labels(_channel, _outcome)  # shown at 0 from the start, for alerts on any increase
alert_events_pending = Gauge(
    "billingproxy_alert_events_pending",
    "Alert deliveries neither made nor given up, by channel (webhook, mail); read at each round of "
    "the alert worker.",
    ["channel"],
    registry=registry,
)
alert_delivery_duration_seconds = Histogram(
    "billingproxy_alert_delivery_duration_seconds",
    "Time one delivery attempt of an alert event took, resolution and connection included.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=registry,
)
recharge_calls = Counter(
    "billingproxy_recharge_calls",
    "Calls this sidecar made to Stripe for auto-recharges, by outcome (created, failed: a card error "
    "or refusal, unreachable: retried later with the same key, gave_up).",
    ["outcome"],
    registry=registry,
)
for _outcome in ("created", "failed", "unreachable", "gave_up"):
    recharge_calls.labels(_outcome)  # shown at 0 from the start, for alerts on any increase
