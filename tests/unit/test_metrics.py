"""docs/metrics.md lists exactly the sidecar's metrics, with their types, and every name follows
Prometheus' conventions (a counter ends in _total, a histogram measures seconds)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from authz_sidecar import metrics

# Modules add their counters to the sidecar's registry when imported: the server imports them all.
importlib.import_module("authz_sidecar.server")
PAGE = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def exposed() -> dict[str, str]:
    """Each metric as /metrics names it (a counter with its _total), by type."""
    return {
        family.name + ("_total" if family.type == "counter" else ""): family.type
        for family in metrics.registry.collect()
    }


def documented() -> dict[str, str]:
    table = PAGE.read_text(encoding="utf-8").split("## Renamed", 1)[0]
    return dict(re.findall(r"^\| `(billingproxy_\w+)` \| (\w+) \|", table, re.MULTILINE))


def test_the_page_lists_every_metric_with_its_type() -> None:
    assert documented() == exposed()


def test_names_follow_prometheus_conventions() -> None:
    for name, kind in exposed().items():
        assert name.startswith("billingproxy_"), name
        assert name.endswith("_total") == (kind == "counter"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name
