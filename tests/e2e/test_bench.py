"""The benchmark's own test: `python -m bench --smoke` (every run for half a second, at a trickle)
through the real stack, a baseline Envoy and a Lua baseline Envoy.

Only what holds at any speed is asserted: the report has every field, the exactly-once books
check ran and found every answered request charged once, and each ratio is the one of this run's
own runs. No number is judged:
on a busy machine the smoke run's numbers mean nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A give-up, not a bound: the smoke run takes ~20 s.
BENCH_GIVE_UP_S = 300

RUNS = {
    "baseline_max",
    "baseline_lua_max",
    "billed_max",
    "billed_max_one_wallet",
    "billed_max_grpc_check",
    "baseline_fixed",
    "baseline_lua_fixed",
    "billed_fixed",
    "baseline_fixed_free",
    "billed_fixed_free",
    "baseline_low",
    "billed_low",
}
RUN_FIELDS = {
    "name",
    "mode",
    "requests",
    "ok",
    "statuses",
    "errors",
    "rps",
    "p50_ms",
    "p99_ms",
    "envoy_process",
    "wall_s",
    "cpu_s",
    "cpu_us_per_request",
    "machine_cores",
}
SUMMARY_FIELDS = {
    "pairs",
    "throughput_ratio",
    "throughput_ratios",
    "throughput_ratio_one_wallet",
    "throughput_ratio_grpc_check",
    "added_p50_ms_at_rate",
    "added_p99_ms_at_rate",
    "added_p50_ms_at_low_rate",
    "added_p99_ms_at_low_rate",
    "sidecar_cpu_us_per_request_at_max",
    "lua_filters",
    "targets",
}
LUA_FIELDS = {
    "pairs",
    "throughput_ratio",
    "throughput_ratios",
    "envoy_cpu_us_added_at_max",
    "billed_envoy_cpu_us_added_at_max",
    "added_p50_ms_at_rate",
    "added_p99_ms_at_rate",
}


def test_a_smoke_run_reports_everything_and_charges_every_request_once(tmp_path: Path) -> None:
    results_path = tmp_path / "results.json"
    # Its own embedded PostgreSQL, never the session's server.
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--no-durable", "--json", str(results_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BENCH_GIVE_UP_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(results_path.read_text())

    runs = results["runs"]
    assert set(runs) == RUNS
    for key, run in runs.items():
        assert set(run) >= RUN_FIELDS, (key, RUN_FIELDS - set(run))
        assert run["ok"] > 0, (key, run["statuses"], run["errors"])
    assert results["options"]["repeats"] == 1 and results["repeats"] == []
    for part in ("body_decode", "sidecar_steps", "host_speed_ms", "environment", "sidecar_counters"):
        assert results[part], part

    # Not books["ok"]: a Check slower than Envoy's 1 s timeout (a machine under heavy load) may
    # leave a refused request's hold reserved until the sweep, which charges nothing.
    books = results["exactly_once"]
    assert books["charged_exactly_once"] and books["invariant_violations"] == [], books
    billed = sum(runs[k]["ok"] for k in RUNS if k.startswith("billed") and k != "billed_fixed_free")
    assert books["billed_2xx_answers"] >= billed > 0  # the warm-ups are billed too
    assert books["usage_entries"] == books["billed_2xx_answers"]

    summary = results["summary"]
    assert set(summary) >= SUMMARY_FIELDS, SUMMARY_FIELDS - set(summary)
    baseline = runs["baseline_max"]["rps"]
    assert summary["throughput_ratio"] == round(runs["billed_max"]["rps"] / baseline, 3)
    assert summary["throughput_ratio_grpc_check"] == round(runs["billed_max_grpc_check"]["rps"] / baseline, 3)
    lua = summary["lua_filters"]
    assert set(lua) >= LUA_FIELDS, LUA_FIELDS - set(lua)
    assert lua["throughput_ratio"] == round(runs["baseline_lua_max"]["rps"] / baseline, 3)
    assert runs["baseline_lua_max"]["envoy_process"] == "envoy_lua"
    assert runs["baseline_max"]["envoy_process"] == "envoy_baseline"

    printed = done.stdout
    assert "Every request charged exactly once: yes" in printed
    assert "Lua filters alone" in printed
