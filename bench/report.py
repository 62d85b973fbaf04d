"""The printed table, the comparisons and the targets, from the results dict of :mod:`bench.runner`."""

from __future__ import annotations

import statistics
from typing import Any

# The targets (docs/benchmarks.md). A miss is reported, never an error: benchmarks are not tests.
ADDED_P99_MAX_MS = 1.0
THROUGHPUT_RATIO_MIN = 0.40
DISTURBED_CORES = 0.1


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def _pairs(summary: dict[str, Any], values: list[str]) -> str:
    """'(median of 3 pairs: a, b, c) ' — or nothing when there was one pair."""
    return f"(median of {summary['pairs']} pairs: {', '.join(values)}) " if summary["pairs"] > 1 else ""


def _envoy_cpu_us(run: dict[str, Any]) -> float:
    """The CPU µs per 2xx answer of the Envoy that served ``run``."""
    cpu_us: float = run["cpu_us_per_request"][run["envoy_process"]]
    return cpu_us


def _median(values: list[float], digits: int = 3) -> float | None:
    return round(statistics.median(values), digits) if values else None


def lua_cost(results: dict[str, Any]) -> dict[str, Any] | None:
    """What the two Lua filters alone add to Envoy: the Lua baseline against the plain baseline,
    both measured in this run (median over the pairs); None for results from before it existed."""
    runs = results["runs"]
    if "baseline_lua_max" not in runs:
        return None
    pairs = [p for p in [runs, *results.get("repeats", [])] if "baseline_lua_max" in p]
    ratios = [
        p["baseline_lua_max"]["rps"] / p["baseline_max"]["rps"] for p in pairs if p["baseline_max"]["rps"]
    ]
    added_cpu = [_envoy_cpu_us(p["baseline_lua_max"]) - _envoy_cpu_us(p["baseline_max"]) for p in pairs]
    billed_added_cpu = [_envoy_cpu_us(p["billed_max"]) - _envoy_cpu_us(p["baseline_max"]) for p in pairs]
    fixed = runs.get("baseline_lua_fixed")
    return {
        "pairs": len(pairs),
        "throughput_ratio": _median(ratios),
        "throughput_ratios": [round(r, 3) for r in ratios],
        "envoy_cpu_us_added_at_max": _median(added_cpu, 1),
        # The same for the billed gateway (ext_authz, the Lua filters, the gRPC access log): the
        # Lua filters' share of what billing costs Envoy.
        "billed_envoy_cpu_us_added_at_max": _median(billed_added_cpu, 1),
        "added_p50_ms_at_rate": _diff(fixed["p50_ms"], runs["baseline_fixed"]["p50_ms"]) if fixed else None,
        "added_p99_ms_at_rate": _diff(fixed["p99_ms"], runs["baseline_fixed"]["p99_ms"]) if fixed else None,
    }


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Derived numbers and the PASS/MISS verdicts; stored in the JSON as ``summary``."""
    runs = results["runs"]
    base, billed, hot = runs["baseline_max"], runs["billed_max"], runs["billed_max_one_wallet"]
    billed_fixed = runs["billed_fixed"]
    base_low, billed_low = runs["baseline_low"], runs["billed_low"]
    grpc_check = runs.get("billed_max_grpc_check")
    # Every pair of the verdicts' runs: the first (in the table) and its repeats (bench.runner).
    pairs = [runs] + results.get("repeats", [])
    ratios = [p["billed_max"]["rps"] / p["baseline_max"]["rps"] for p in pairs if p["baseline_max"]["rps"]]
    added_p99s = [
        d
        for p in pairs
        if (d := _diff(p["billed_fixed"]["p99_ms"], p["baseline_fixed"]["p99_ms"])) is not None
    ]
    added_p50s = [
        d
        for p in pairs
        if (d := _diff(p["billed_fixed"]["p50_ms"], p["baseline_fixed"]["p50_ms"])) is not None
    ]
    ratio = statistics.median(ratios) if ratios else None
    hot_ratio = hot["rps"] / base["rps"] if base["rps"] else None
    added_p99_fixed = round(statistics.median(added_p99s), 3) if added_p99s else None
    summary = {
        "pairs": len(pairs),
        "throughput_ratio": round(ratio, 3) if ratio is not None else None,
        "throughput_ratios": [round(r, 3) for r in ratios],
        "added_p99_ms_at_rate_pairs": added_p99s,
        "throughput_ratio_one_wallet": round(hot_ratio, 3) if hot_ratio is not None else None,
        "added_p50_ms_at_max": _diff(billed["p50_ms"], base["p50_ms"]),
        "added_p99_ms_at_max": _diff(billed["p99_ms"], base["p99_ms"]),
        "added_p50_ms_at_rate": round(statistics.median(added_p50s), 3) if added_p50s else None,
        "added_p99_ms_at_rate": added_p99_fixed,
        "rate": billed_fixed["target_rate"],
        # Billing without PostgreSQL on the request's path (a free GET): the floor of added latency.
        "added_p50_ms_at_rate_no_database": _diff(
            runs["billed_fixed_free"]["p50_ms"], runs["baseline_fixed_free"]["p50_ms"]
        )
        if "billed_fixed_free" in runs
        else None,
        "added_p99_ms_at_rate_no_database": _diff(
            runs["billed_fixed_free"]["p99_ms"], runs["baseline_fixed_free"]["p99_ms"]
        )
        if "billed_fixed_free" in runs
        else None,
        "added_p50_ms_at_low_rate": _diff(billed_low["p50_ms"], base_low["p50_ms"]),
        "added_p99_ms_at_low_rate": _diff(billed_low["p99_ms"], base_low["p99_ms"]),
        "low_rate": billed_low["target_rate"],
        "billed_sustains_rate": billed_fixed["rps"] >= 0.97 * billed_fixed["target_rate"]
        and billed_fixed["ok"] == billed_fixed["requests"],
        "sidecar_cpu_us_per_request_at_max": billed["cpu_us_per_request"]["sidecar"],
        "sidecar_cpu_us_per_request_at_rate": billed_fixed["cpu_us_per_request"]["sidecar"],
        "sidecar_cpu_us_per_request_at_low_rate": billed_low["cpu_us_per_request"]["sidecar"],
        "throughput_ratio_grpc_check": round(grpc_check["rps"] / base["rps"], 3)
        if grpc_check and base["rps"]
        else None,
        "sidecar_cpu_us_per_request_grpc_check": grpc_check["cpu_us_per_request"]["sidecar"]
        if grpc_check
        else None,
        "sidecar_peak_rss_mib": round(results["sidecar_peak_rss_kib"] / 1024, 1)
        if results.get("sidecar_peak_rss_kib")
        else None,
        "lua_filters": lua_cost(results),
    }
    summary["targets"] = {
        f"added p99 <= {ADDED_P99_MAX_MS:g} ms at {summary['rate']:.0f} req/s": (
            added_p99_fixed is not None and added_p99_fixed <= ADDED_P99_MAX_MS
        ),
        f"billed throughput >= {THROUGHPUT_RATIO_MIN:.0%} of unbilled": (
            ratio is not None and ratio >= THROUGHPUT_RATIO_MIN
        ),
        "every request charged exactly once, no hold left pending": bool(results["exactly_once"]["ok"]),
    }
    return summary


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "n/a"
    return format(value, spec)


def render(results: dict[str, Any]) -> str:
    summary = results["summary"]
    runs = results["runs"]
    lines: list[str] = []
    env = results["environment"]
    lines.append("")
    lines.append(
        f"BillingProxy benchmark — {env['date']} — {env['cpus']} CPUs, Python {env['python']}, "
        f"{results['options']['concurrency']} connections (closed loop), "
        f"{results['options']['duration_s']:g} s per run"
    )
    lines.append("")
    header = (
        f"{'run':<26}{'req/s':>7}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>8}{'cores':>6}"
        f" | CPU µs per 2xx: {'sidecar':>7}{'envoy':>6}{'pg':>6}{'backend':>8}{'loadgen':>8}"
        f" | {'foreign':>7}"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for key, run in runs.items():
        billed = key.startswith("billed")
        cpu = run["cpu_us_per_request"]
        envoy = cpu[run.get("envoy_process") or ("envoy" if billed else "envoy_baseline")]
        foreign = run["machine_cores"]["other_processes"]
        non_ok = sum(v for s, v in run["statuses"].items() if not s.startswith("2")) + sum(
            run["errors"].values()
        )
        lines.append(
            f"{run['name']:<26}{run['rps']:>7.0f}"
            f"{_fmt(run['p50_ms'], '.2f'):>9}{_fmt(run['p99_ms'], '.2f'):>9}"
            f"{non_ok:>8}{_fmt(run['machine_cores_busy'], '.2f'):>6} | {'':15}"
            f"{_fmt(cpu['sidecar'], '.0f') if billed else '-':>7}{envoy:>6.0f}"
            f"{cpu['postgres']:>6.0f}{cpu['backend']:>8.0f}{cpu['generator']:>8.0f}"
            f" | {foreign:>7.2f}" + (" !" if foreign > DISTURBED_CORES else "")
        )
    lines.append("")
    lines.append(
        "cores: machine CPU busy / wall time (2 cores). "
        "CPU µs per 2xx: each process's CPU time / 2xx answers;"
    )
    lines.append(
        "billed runs include settling the access log after the load stops. foreign: cores used meanwhile by"
    )
    lines.append(
        "processes that are not the benchmark's; "
        f"'!' marks a run disturbed by more than {DISTURBED_CORES} cores of them."
    )
    speed = results.get("host_speed_ms")
    if speed:
        lines.append(
            f"host speed: the fixed calibration work took {speed['start']:.0f} ms of CPU at the start, "
            f"{_fmt(speed.get('end'), '.0f')} ms at the end (lower is faster; compare runs by it)."
        )
    lines.append("")
    lines.append("Billing overhead")
    lines.append(
        f"  throughput ratio billed/unbilled      {_fmt(summary['throughput_ratio'], '.3f')}  "
        + _pairs(summary, [f"{r:.3f}" for r in summary["throughput_ratios"]])
        + f"(one hot wallet: {_fmt(summary['throughput_ratio_one_wallet'], '.2f')})"
    )
    if summary.get("throughput_ratio_grpc_check") is not None:
        lines.append(
            f"  with the gRPC Check instead of HTTP  ratio {summary['throughput_ratio_grpc_check']:.2f}, "
            f"sidecar {summary['sidecar_cpu_us_per_request_grpc_check']:.0f} µs per request "
            f"(BILLINGPROXY_CHECK_TRANSPORT=grpc)"
        )
    lines.append(
        f"  added latency at max load            p50 {_fmt(summary['added_p50_ms_at_max'], '+.2f')} ms, "
        f"p99 {_fmt(summary['added_p99_ms_at_max'], '+.2f')} ms"
    )
    lines.append(
        f"  added latency at {summary['rate']:.0f} req/s           p50 "
        f"{_fmt(summary['added_p50_ms_at_rate'], '+.2f')} ms, "
        f"p99 {_fmt(summary['added_p99_ms_at_rate'], '+.2f')} ms  "
        + _pairs(summary, [f"{d:+.2f}" for d in summary["added_p99_ms_at_rate_pairs"]])
        + (
            ""
            if summary["billed_sustains_rate"]
            else " (the billed gateway does not sustain this rate here: overload)"
        )
    )
    lines[-1] = lines[-1].rstrip()
    if summary.get("added_p99_ms_at_rate_no_database") is not None:
        lines.append(
            "    … with no database on the path      p50 "
            f"{_fmt(summary['added_p50_ms_at_rate_no_database'], '+.2f')} ms, "
            f"p99 {_fmt(summary['added_p99_ms_at_rate_no_database'], '+.2f')} ms  "
            f"(GET /v1/models: a Check with no hold, same filters and access log)"
        )
    lines.append(
        f"  added latency at {summary['low_rate']:.0f} req/s           p50 "
        f"{_fmt(summary['added_p50_ms_at_low_rate'], '+.2f')} ms, "
        f"p99 {_fmt(summary['added_p99_ms_at_low_rate'], '+.2f')} ms"
    )
    split = runs["billed_max"]["cpu_us_per_request"]
    lines.append(
        "  sidecar CPU per request              "
        f"{_fmt(summary['sidecar_cpu_us_per_request_at_max'], '.0f')} µs at max "
        f"(user {split['sidecar_user']:.0f} + system {split['sidecar_system']:.0f}), "
        f"{_fmt(summary['sidecar_cpu_us_per_request_at_low_rate'], '.0f')} µs "
        f"at {summary['low_rate']:.0f} req/s"
    )
    check_means = [runs[k].get("sidecar_check_mean_ms") for k in ("billed_max", "billed_fixed", "billed_low")]
    lines.append(
        f"  Check time inside the sidecar (mean)  {_fmt(check_means[0], '.2f')} ms at max, "
        f"{_fmt(check_means[1], '.2f')} ms at {summary['rate']:.0f} req/s, "
        f"{_fmt(check_means[2], '.2f')} ms at {summary['low_rate']:.0f} req/s"
    )
    lines.append(f"  sidecar peak memory (VmHWM)          {_fmt(summary['sidecar_peak_rss_mib'], '.1f')} MiB")
    lag = [
        runs[k].get("settle_lag_s")
        for k in ("billed_max", "billed_max_one_wallet", "billed_fixed", "billed_low")
    ]
    lines.append(
        f"  settlement backlog after load        {' / '.join(_fmt(x, '.2f') for x in lag)} s "
        f"(max / one wallet / {summary['rate']:.0f} / {summary['low_rate']:.0f} req/s)"
    )
    lua = summary.get("lua_filters")
    if lua:
        lines.append("")
        lines.append(
            "Lua filters alone (usage_filter.lua + upstream_headers.lua, no ext_authz, no access log), "
            "against the baseline"
        )
        lines.append(
            f"  throughput ratio with/without        {_fmt(lua['throughput_ratio'], '.3f')}  "
            + _pairs(lua, [f"{r:.3f}" for r in lua["throughput_ratios"]])
        )
        lines[-1] = lines[-1].rstrip()
        lines.append(
            "  Envoy CPU per request, added         "
            f"{_fmt(lua['envoy_cpu_us_added_at_max'], '+.0f')} µs at max "
            f"(billing as a whole adds {_fmt(lua['billed_envoy_cpu_us_added_at_max'], '+.0f')} µs)"
        )
        lines.append(
            f"  added latency at {summary['rate']:.0f} req/s           p50 "
            f"{_fmt(lua['added_p50_ms_at_rate'], '+.2f')} ms, "
            f"p99 {_fmt(lua['added_p99_ms_at_rate'], '+.2f')} ms"
        )
    steps = results.get("sidecar_steps")
    if steps:
        lines.append("")
        lines.append(
            f"Sidecar CPU by step ({steps['calls_per_step']} sequential calls each, "
            "µs per call; wall µs in brackets)"
        )
        lines.append(
            "  real sidecar, HTTP Check: Check GET, cached key "
            f"{steps['check_get_cached_key']['sidecar_cpu_us']:.0f} "
            f"[{steps['check_get_cached_key']['wall_us']:.0f}]  (HTTP parse + answer, key cache, no database)"
        )
        lines.append(
            "                            Check POST, cached key "
            f"{steps['check_post_cached_key']['sidecar_cpu_us']:.0f} "
            f"[{steps['check_post_cached_key']['wall_us']:.0f}]  (+ body JSON + hold)"
        )
        lines.append(
            "                            Check POST, new key "
            f"{steps['check_post_new_key']['sidecar_cpu_us']:.0f} "
            f"[{steps['check_post_new_key']['wall_us']:.0f}]  (+ key look-up)"
        )
        client = steps["check_post_cached_key"].get("client_cpu_us")
        if client is not None:
            lines.append(
                f"                            (wall includes this process's aiohttp client, ~{client:.0f} µs "
                "CPU per call)"
            )
        lines.append(
            "  real sidecar, gRPC ALS:   access-log entry settled "
            f"{steps['access_log_settle']['sidecar_cpu_us']:.0f}"
        )
        lines.append(
            f"  same SQL in-process:      hold: SQLAlchemy {steps['place_sqlalchemy']['bench_cpu_us']:.0f} "
            f"[{steps['place_sqlalchemy']['wall_us']:.0f}], asyncpg "
            f"{steps['place_asyncpg']['bench_cpu_us']:.0f} "
            f"[{steps['place_asyncpg']['wall_us']:.0f}]"
        )
        lines.append(
            "                            settle: SQLAlchemy (7 round trips) "
            f"{steps['settle_sqlalchemy']['bench_cpu_us']:.0f} "
            f"[{steps['settle_sqlalchemy']['wall_us']:.0f}], asyncpg 7 round trips "
            f"{steps['settle_asyncpg_seven_round_trips']['bench_cpu_us']:.0f} "
            f"[{steps['settle_asyncpg_seven_round_trips']['wall_us']:.0f}], asyncpg one statement "
            f"{steps['settle_asyncpg_one_statement']['bench_cpu_us']:.0f} "
            f"[{steps['settle_asyncpg_one_statement']['wall_us']:.0f}]"
        )
        if "place_many" in steps:
            lines.append(
                f"  group commit in-process:  {steps['group_commit_batch']} per transaction, per request: "
                f"hold {steps['place_many']['bench_cpu_us']:.0f} [{steps['place_many']['wall_us']:.0f}] "
                f"(one by one {steps['place_asyncpg']['bench_cpu_us']:.0f} "
                f"[{steps['place_asyncpg']['wall_us']:.0f}]),"
            )
            lines.append(
                f"{'':28}settle {steps['settle_many']['bench_cpu_us']:.0f} "
                f"[{steps['settle_many']['wall_us']:.0f}] "
                f"(one by one {steps['settle_asyncpg_one_statement']['bench_cpu_us']:.0f} "
                f"[{steps['settle_asyncpg_one_statement']['wall_us']:.0f}])"
            )
        if "place_many_pipelined" in steps:
            lines.append(
                f"{'':28}PostgreSQL's CPU per request, set-based statement vs pipelined: "
                f"hold {steps['place_many']['pg_cpu_us']:.0f} vs "
                f"{steps['place_many_pipelined']['pg_cpu_us']:.0f}, "
                f"settle {steps['settle_many']['pg_cpu_us']:.0f} vs "
                f"{steps['settle_many_pipelined']['pg_cpu_us']:.0f}"
            )
    decode = results["body_decode"]
    lines.append("")
    lines.append(
        f"Getting the model from the body ({decode['http_request_bytes']} B Check request from Envoy, "
        f"{decode['body_bytes']} B body, {decode['parser']})"
    )
    lines.append(
        f"  parse the HTTP request {decode['parse_us']:.1f} µs, json.loads(body) "
        f"{decode['json_loads_us']:.1f} µs; "
        f"all of it {decode['check_input_total_us']:.1f} µs; build the {decode['admit_response_bytes']} B "
        f"admit answer {decode['admit_response_us']:.1f} µs"
    )
    books = results["exactly_once"]
    lines.append("")
    lines.append(f"Every request charged exactly once: {'yes' if books['charged_exactly_once'] else 'NO'}")
    lines.append(
        f"  billed 2xx answers {books['billed_2xx_answers']}, usage entries {books['usage_entries']} "
        f"(2xx not charged {books['answered_2xx_not_charged']}, charged without a 2xx "
        f"{books['charged_without_2xx_answer']}), holds {books['holds_by_state']}"
    )
    lines.append(
        f"  charged amounts (nano-USD: count) {books['charged_amounts_nano']}, expected "
        f"{books['expected_cost_nano']} each; invariant violations: {len(books['invariant_violations'])}"
    )
    if books["billed_non_2xx_answers"]:
        lines.append(f"  non-2xx answers {books['billed_non_2xx_answers']}")
    lines.append(
        f"  holds left pending: {books['pending_holds']}"
        + (
            f" ({books['pending_holds_of_refused_requests']} of requests "
            "Envoy refused with 503 after its 1 s "
            "ext_authz timeout, most likely placed after their void; reserved until the TTL sweep)"
            if books["pending_holds"]
            else ""
        )
    )
    counters = results.get("sidecar_counters")
    if counters:
        outcomes = ", ".join(f"{k} {v:.0f}" for k, v in sorted(counters["settlements"].items()))
        lines.append(f"  sidecar settlement outcomes (all runs, /metrics): {outcomes}")
    lines.append("")
    lines.append("Targets")
    for name, passed in summary["targets"].items():
        lines.append(f"  {'PASS' if passed else 'MISS'}  {name}")
    return "\n".join(lines)
