"""`python -m bench` (`make bench`): billing overhead through real Envoy, the sidecar and PostgreSQL.

Prints a table and writes ``bench/results/latest.json``. Exits 0 whatever the numbers: a missed
target is reported as MISS, not as a failure. It exits non-zero only if the benchmark itself
could not run (a part of the stack did not start).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

from bench import report, runner

RESULTS = Path(__file__).parent / "results" / "latest.json"


def _parser() -> argparse.ArgumentParser:
    defaults = runner.Options()
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
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
        "--quick", action="store_true", help="3 s runs, 1 s warm-up: a smoke test of the benchmark itself"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the data dir and logs (Envoy, sidecar, PostgreSQL)"
    )
    parser.add_argument(
        "--json", type=Path, default=RESULTS, help="where to write the results (default %(default)s)"
    )
    return parser


async def _main(options: runner.Options) -> dict:
    bench = runner.Bench(options, say=lambda m: print(m, flush=True))
    try:
        results = await bench.run_all()
    finally:
        await bench.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.repeats = 3.0, 1.0, 1
    if args.repeats < 1:
        _parser().error("--repeats must be at least 1")
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
