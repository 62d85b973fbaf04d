"""Prometheus metrics of the sidecar, served on the admin port at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

registry = CollectorRegistry(auto_describe=True)

check_decisions = Counter(
    "billingproxy_check_decisions",
    "ext_authz Check answers, by result (allowed, or the error code of the denial).",
    ["result"],
    registry=registry,
)
check_seconds = Histogram(
    "billingproxy_check_seconds",
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
outstanding_holds = Gauge(
    "billingproxy_outstanding_holds",
    "Holds placed and not yet settled (read at each expiry sweep).",
    registry=registry,
)
settle_failures = Counter(
    "billingproxy_settle_failures",
    "Access-log entries that could not be settled after retries (the hold will expire).",
    registry=registry,
)
