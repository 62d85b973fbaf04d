"""The chaos benchmark's own test: `python -m bench --chaos --smoke` (30 s at 20 req/s, a fault
every few seconds, each kind at least once) through the real stack, exiting 0 only with every
difference 0.

Only what holds at any speed is asserted: the run injected each kind of fault, served requests
between them, and its books found every admitted request charged or voided exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
# A give-up, not a bound: the smoke run takes ~40 s.
CHAOS_GIVE_UP_S = 300


def test_a_smoke_chaos_run_breaks_each_part_and_every_request_ends_charged_or_voided_once(
    tmp_path: Path,
) -> None:
    results_path = tmp_path / "chaos.json"
    # Its own embedded PostgreSQL whatever the environment: the run stops and starts it.
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--chaos", "--smoke", "--no-durable", "--json", str(results_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=CHAOS_GIVE_UP_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    results = json.loads(results_path.read_text())

    assert {fault["kind"] for fault in results["faults"]} == {"sidecar", "postgres", "envoy"}
    assert results["sidecar_restarts"] == sum(1 for f in results["faults"] if f["kind"] == "sidecar")
    books = results["books"]
    assert set(books["differences"].values()) == {0}, books
    assert books["problems"] == []
    assert books["outcomes"]["complete"] > 0 and books["outcomes"]["refused"] > 0
    assert books["admitted"] == books["settled"] == books["charged"] + books["voided"]
    assert "differences (each must be 0): admitted - settled = 0" in done.stdout
    assert "exactly once: yes" in done.stdout
