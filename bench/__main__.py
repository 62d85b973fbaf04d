"""`python -m bench` (`make bench`): billing overhead through real Envoy, the sidecar and PostgreSQL.

Prints a table and writes ``bench/results/latest.json``. Exits 0 whatever the numbers: a missed
target is reported as MISS, not as a failure. It exits non-zero only if the benchmark itself
could not run (a part of the stack did not start).

Besides billing's overhead, the report says what the two Lua filters alone add to Envoy
(``baseline + Lua`` rows; "Lua filters alone"), against the plain baseline of the same run.
``--smoke`` runs everything once, for a fraction of a second each, at a trickle: it shows the
benchmark itself works (the report and the exactly-once books check), and its numbers mean nothing.

``--chaos`` runs the other benchmark instead, :mod:`bench.chaos` (`make bench-chaos`): load at a
fixed rate while the sidecar, PostgreSQL and Envoy are broken at random times, then the books;
``python -m bench --chaos --help`` lists its own options.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench import chaos, report, runner

RESULTS = Path(__file__).parent / "results" / "latest.json"
# What --smoke sets (argparse's names): the shortest run that still takes every path.
SMOKE = {
    "duration": 0.5,
    "warmup": 0.2,
    "concurrency": 2,
    "rate": 20.0,
    "low_rate": 10.0,
    "wallets": 2,
    "repeats": 1,
    "quiet_wait": 0.0,
    "step_calls": 5,
}
SMOKE_MICRO_TARGET_S = 0.002


def _parser() -> argparse.ArgumentParser:
    defaults = runner.Options()
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=defaults.duration_s,
        help="seconds per measured run (default %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=defaults.warmup_s,
        help="seconds of warm-up per gateway (default %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=defaults.concurrency,
        help="connections of the closed-loop runs (default %(default)s)",
    )
    parser.add_argument(
        "--rate", type=float, default=defaults.rate, help="req/s of the fixed-rate runs (default %(default)s)"
    )
    parser.add_argument(
        "--low-rate",
        type=float,
        default=defaults.low_rate,
        help="req/s of the second, sustainable fixed-rate pair (default %(default)s)",
    )
    parser.add_argument(
        "--wallets",
        type=int,
        default=defaults.wallets,
        help="wallets (one key each) of the many-wallet runs (default %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=defaults.repeats,
        help="times the max and fixed-rate pairs run, interleaved; "
        "verdicts take the median (default %(default)s)",
    )
    parser.add_argument(
        "--no-durable",
        dest="durable",
        action="store_false",
        help="embedded PostgreSQL without fsync/synchronous_commit (as the tests run it); "
        "default: durable, as `billingproxy up`",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=defaults.quiet_wait_max_s,
        help="seconds to wait at most, before each run, for the machine to be quiet; 0: measure at once "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--step-calls",
        type=int,
        default=defaults.step_calls,
        help="sequential calls per step of the sidecar's CPU by step (default %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-up, one pair")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the benchmark's own test, ~20 s in all: every run for "
        f"{SMOKE['duration']:g} s at {SMOKE['concurrency']} connections or {SMOKE['rate']:g} req/s, "
        f"{SMOKE['wallets']} wallets, one pair, no quiet wait, {SMOKE['step_calls']} calls per step; "
        "the numbers mean nothing",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the data dir and logs (Envoy, sidecar, PostgreSQL)"
    )
    parser.add_argument(
        "--chaos",
        action="store_true",
        help="the chaos run instead (bench/chaos.py; its options: python -m bench --chaos --help)",
    )
    parser.add_argument(
        "--json", type=Path, default=RESULTS, help="where to write the results (default %(default)s)"
    )
    return parser


async def _main(options: runner.Options) -> dict[str, Any]:
    bench = runner.Bench(options, say=lambda m: print(m, flush=True))
    try:
        results = await bench.run_all()
    finally:
        await bench.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--chaos" in argv:
        return chaos.main([arg for arg in argv if arg != "--chaos"])
    args = _parser().parse_args(argv)
    micro_target_s = runner.Options.micro_target_s
    if args.quick:
        args.duration, args.warmup, args.repeats = 3.0, 1.0, 1
    if args.smoke:
        vars(args).update(SMOKE)
        micro_target_s = SMOKE_MICRO_TARGET_S
    if args.repeats < 1:
        _parser().error("--repeats must be at least 1")
    if args.step_calls < 1:
        _parser().error("--step-calls must be at least 1")
    options = runner.Options(
        duration_s=args.duration,
        warmup_s=args.warmup,
        concurrency=args.concurrency,
        rate=args.rate,
        low_rate=args.low_rate,
        wallets=args.wallets,
        durable=args.durable,
        keep=args.keep,
        repeats=args.repeats,
        quiet_wait_max_s=args.quiet_wait,
        step_calls=args.step_calls,
        micro_target_s=micro_target_s,
    )
    started = time.perf_counter()
    try:
        results = asyncio.run(_main(options))
    except Exception as exc:  # noqa: BLE001 (the stack did not start: say why, as `billingproxy up` would)
        print(f"bench: could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    results["options"] = dataclasses.asdict(options)
    results["environment"] = runner.environment()
    results["wall_time_s"] = round(time.perf_counter() - started, 1)
    results["summary"] = report.summarize(results)
    print(report.render(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    print(f"\nresults: {args.json} ({results['wall_time_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
