"""`billingproxy probe` is kubelet's exec probe: a new Python process every few seconds in every
gateway pod, under a probe timeout. What it imports is what it costs, so the probe path imports
the standard library and the settings, never the database layer, the sidecar or a framework.
Checked in a fresh interpreter's ``sys.modules`` (what was imported, not how long it took)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: Packages a probe has no use for; any one of them costs tens to hundreds of milliseconds.
HEAVY = (
    "sqlalchemy",
    "alembic",
    "asyncpg",
    "asyncio",
    "aiohttp",
    "grpc",
    "yaml",
    "litellm",
    "kopf",
    "stripe",
    "authz_sidecar",
    "billing_operator",
    "billing_stripe",
    "billing.database",
    "billing.pricing",
)

_IMPORTED = """
import json, sys
from billingproxy import cli
status = cli.main(sys.argv[1:])
print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
"""


@pytest.mark.parametrize("checks", [["healthz"], ["readyz", "envoy-ready"], ["drain", "--within", "1"]])
def test_the_probe_command_imports_no_heavy_module(checks: list[str], tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("BILLINGPROXY_")}
    env.pop("DATABASE_URL", None)
    # Nothing listens: the probe fails (status 1) after having imported all it would use.
    env.update(BILLINGPROXY_DATA_DIR=str(tmp_path), BILLINGPROXY_ADMIN_PORT="1")
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTED, "probe", *checks],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == 1, done.stderr  # the probe ran, and found nothing listening
    imported = [
        module
        for module in result["modules"]
        if any(module == h or module.startswith(h + ".") for h in HEAVY)
    ]
    assert imported == []
