"""`python -m bench --chaos` (`make bench-chaos`): load at a fixed rate while parts of the gateway
are broken at random times, then the books of every request.

What runs: the local stack as ``billingproxy up`` starts it (:class:`Stack`, its own embedded
PostgreSQL in a throw-away data dir, the demo backend, the supervised sidecar, Envoy), and an
open-loop load of ``rate`` requests per second for ``duration`` seconds — chat completions and
Anthropic messages, streamed and not (``bench.books.SHAPES``), on ``wallets`` wallets in turn.
Meanwhile, at times drawn from ``seed``, one fault at a time, the three kinds in turn (in an
order drawn from the seed too):

- **sidecar**: SIGKILLed; the Stack's supervisor starts it again (its back-off, then /readyz);
- **postgres**: stopped (fast shutdown) for a drawn 1–4 s, then started on the same port;
- **envoy**: restarted — gracefully by default (buffered access-log entries sent, SIGTERM), or
  SIGKILLed with ``--kill-envoy``: the reports Envoy had not written yet die with it, so a
  request that finished at that moment is charged its hold (docs/failures.md, "Envoy killed");
  the books allow that, for those requests only, and count them.

After the load, it waits until every hold of the run is posted or voided, then prints the books
(``bench.books``): requests admitted (holds), served (the demo backend's own record), settled,
charged, voided, the differences that must be 0, and the longest time a served request stayed
unsettled. It exits 1 if any difference is not 0, 2 if the run itself could not start.

A hold no log reports is charged its estimate 10 s after its Check here (its TTL, with no grace
after it: ``BILLINGPROXY_HOLD_TTL_S``, ``BILLINGPROXY_HOLD_REPORT_GRACE_S``; billing/expiry.py):
with the defaults (600 s + 900 s) a request Envoy died in the middle of would keep the run waiting
25 minutes for its books.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench import books, runner
from billing import database, pricing
from billingproxy.devstack.local_stack import Stack, free_ports_env

RESULTS = Path(__file__).parent / "results" / "chaos-latest.json"
FAULTS = ("sidecar", "postgres", "envoy")
SETTINGS = {
    "BILLINGPROXY_HOLD_TTL_S": "10",
    "BILLINGPROXY_UPSTREAM_TIMEOUT_S": "5",
    "BILLINGPROXY_HOLD_REPORT_GRACE_S": "0",
}
# An unreported hold is charged 10 s after its Check and the sweep runs every 5 s: every hold is
# resolved well within this after the load stops, or something is wrong.
RESOLVE_TIMEOUT_S = 60.0
# Open loop: requests in flight at most (a gateway that stops answering cannot pile up more).
IN_FLIGHT_MAX = 256
REQUEST_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class Options:
    duration_s: float = 180.0
    rate: float = 40.0
    wallets: int = 10
    seed: int = 1
    # Seconds from one fault's recovery to the next fault, drawn uniformly from this range.
    gap_s: tuple[float, float] = (10.0, 25.0)
    postgres_down_s: tuple[float, float] = (1.0, 4.0)
    kill_envoy: bool = False
    durable: bool = True
    keep: bool = False


SMOKE = Options(duration_s=30.0, rate=20.0, wallets=3, gap_s=(2.0, 4.0), postgres_down_s=(1.0, 1.5))


@dataclasses.dataclass
class Fault:
    kind: str
    at_s: float  # from the start of the load
    recovered_after_s: float = 0.0
    detail: str = ""


class Chaos:
    def __init__(self, options: Options, say: Callable[[str], object] = print) -> None:
        self.options = options
        self.say = say
        self.random = random.Random(options.seed)
        self.data_dir = Path(tempfile.mkdtemp(prefix="billingproxy-chaos-"))
        self._stack: Stack | None = None
        self.faults: list[Fault] = []
        self.seen: list[books.Seen] = []
        self.envoy_killed_at: list[float] = []  # time.time() of each SIGKILL of Envoy
        self.envoy_stopped_at: list[float] = []  # time.time() of each graceful stop of Envoy

    @property
    def stack(self) -> Stack:
        assert self._stack is not None, "Chaos.run() first"
        return self._stack

    async def run(self) -> dict[str, Any]:
        o = self.options
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("BILLINGPROXY_") and k != "DATABASE_URL"
        }
        env.update(BILLINGPROXY_DATA_DIR=str(self.data_dir), **free_ports_env(), **SETTINGS)
        self._stack = Stack(env, say=lambda m: self.say(f"  {m}"), durable=o.durable)
        self.say("starting the stack (its own PostgreSQL: the run stops and starts it)…")
        await self.stack.start()
        engine = database.create_engine(self.stack.database_url, pool_size=1)
        try:
            wallets = await runner.create_wallets(engine, o.wallets)
            async with aiohttp.ClientSession() as session:
                arrivals_before = len(await books.backend_arrivals(session, self.stack.backend_url))
            self.say(
                f"load: {o.rate:g} req/s for {o.duration_s:g} s on {o.wallets} wallets; "
                f"faults from seed {o.seed}"
            )
            started = time.monotonic()
            load = asyncio.create_task(self._load(wallets, started))
            await self._break_things(started, load)
            await load
            self.say("waiting until every hold is posted or voided…")
            wallet_ids = [wallet_id for wallet_id, _ in wallets]
            resolved = await books.wait_resolved(engine, wallet_ids, RESOLVE_TIMEOUT_S)
            view = await books.read_ledger(
                engine, wallet_ids, report_grace_s=self.stack.settings.hold_report_grace_s
            )
        finally:
            await engine.dispose()
        async with aiohttp.ClientSession() as session:
            arrivals = await books.backend_arrivals(session, self.stack.backend_url, since=arrivals_before)
        settings = self.stack.settings
        tariff = books.Tariff(pricing.load(settings.price_overrides_path, settings.markup_percent))
        verdict = books.compare(
            self.seen,
            view,
            tariff,
            dict.fromkeys(wallet_ids, runner.GRANT_NANO),
            arrivals,
            self.envoy_killed_at,
            self.envoy_stopped_at,
        )
        return {
            "options": dataclasses.asdict(o),
            "faults": [dataclasses.asdict(f) for f in self.faults],
            "resolved_within_timeout": resolved,
            "sidecar_restarts": self.stack.sidecar_restarts,
            "books": {
                "outcomes": dict(verdict.outcomes),
                "admitted": verdict.admitted,
                "served": verdict.served,
                "settled": verdict.settled,
                "charged": verdict.charged,
                "charged_estimate": verdict.charged_estimate,
                "charged_not_served": verdict.charged_not_served,
                "unserved_estimated_after_envoy_kill": verdict.unserved_estimated_after_envoy_kill,
                "estimated_after_envoy_kill": verdict.estimated_after_envoy_kill,
                "voided": verdict.voided,
                "differences": verdict.differences,
                "longest_unsettled_s": round(verdict.longest_unsettled_s, 3),
                "problems": verdict.problems,
            },
            "exact": verdict.exact and resolved,
            "report": books.render(verdict),
        }

    async def _load(self, wallets: list[tuple[str, str]], started: float) -> None:
        """``rate`` requests per second on a fixed schedule (open loop), whatever the gateway does."""
        o = self.options
        turns = itertools.cycle(itertools.product(books.SHAPES, wallets))
        connector = aiohttp.TCPConnector(limit=IN_FLIGHT_MAX)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one(shape: books.Shape, wallet_id: str, api_key: str) -> None:
                self.seen.append(await books.send(session, self.stack.gateway_url, shape, api_key, wallet_id))

            tasks = []
            for n in range(int(o.rate * o.duration_s)):
                delay = started + n / o.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                shape, (wallet_id, api_key) = next(turns)
                tasks.append(asyncio.create_task(one(shape, wallet_id, api_key)))
            await asyncio.gather(*tasks)

    async def _break_things(self, started: float, load: asyncio.Task[None]) -> None:
        """One fault at a time until the load's schedule is nearly over, the kinds in turn."""
        o = self.options
        kinds = list(FAULTS)
        self.random.shuffle(kinds)
        for kind in itertools.cycle(kinds):
            gap = self.random.uniform(*o.gap_s)
            if time.monotonic() - started + gap > o.duration_s - min(o.gap_s):
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(load), gap)
                return  # the load ended early
            fault = Fault(kind, round(time.monotonic() - started, 2))
            began = time.monotonic()
            fault.detail = await self._inject(kind)
            fault.recovered_after_s = round(time.monotonic() - began, 2)
            self.faults.append(fault)
            self.say(f"  {fault.at_s:6.1f} s  {fault.detail}; recovered after {fault.recovered_after_s:g} s")

    async def _inject(self, kind: str) -> str:
        stack = self.stack
        if kind == "sidecar":
            restarts = stack.sidecar_restarts
            await stack.kill_sidecar()
            await stack.wait_sidecar_restarted(restarts + 1)
            return "sidecar SIGKILLed, restarted by the supervisor"
        if kind == "postgres":
            down_s = self.random.uniform(*self.options.postgres_down_s)
            await stack.stop_postgres()
            await asyncio.sleep(down_s)  # the outage itself: how long the database stays away
            await stack.start_postgres()
            return f"PostgreSQL stopped for {down_s:.1f} s, started again"
        assert kind == "envoy", kind
        (self.envoy_killed_at if self.options.kill_envoy else self.envoy_stopped_at).append(time.time())
        await stack.restart_envoy(hard=self.options.kill_envoy)
        return (
            "Envoy SIGKILLed and started again" if self.options.kill_envoy else "Envoy restarted gracefully"
        )

    async def stop(self) -> None:
        postgres = self._stack.embedded_postgres if self._stack is not None else None
        if self._stack is not None:
            await self._stack.stop()
        if self.options.keep:
            self.say(f"  kept the data and logs in {self.data_dir}")
            return
        await runner.discard_data_dir(self.data_dir, postgres, own_postgres=True)


def render(results: dict[str, Any]) -> str:
    o = results["options"]
    lines = [
        f"BillingProxy chaos run — {o['rate']:g} req/s for {o['duration_s']:g} s, {o['wallets']} wallets, "
        f"seed {o['seed']}, Envoy {'SIGKILLed' if o['kill_envoy'] else 'restarted gracefully'}",
        "",
        "faults (from the start of the load):",
        *(
            f"  {f['at_s']:6.1f} s  {f['detail']}; recovered after {f['recovered_after_s']:g} s"
            for f in results["faults"]
        ),
        "",
        results["report"],
    ]
    if not results["resolved_within_timeout"]:
        lines.append(f"holds still unresolved {RESOLVE_TIMEOUT_S:g} s after the load")
    lines.append(f"exactly once: {'yes' if results['exact'] else 'NO'}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    d = Options()
    parser = argparse.ArgumentParser(
        prog="python -m bench --chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--duration", type=float, default=d.duration_s, help="seconds of load (default %(default)s)"
    )
    parser.add_argument(
        "--rate", type=float, default=d.rate, help="requests per second (default %(default)s)"
    )
    parser.add_argument(
        "--wallets", type=int, default=d.wallets, help="wallets the load uses (default %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=d.seed, help="draws the faults' times and order (default %(default)s)"
    )
    parser.add_argument(
        "--kill-envoy", action="store_true", help="SIGKILL Envoy instead of restarting it gracefully"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"the run's own test: {SMOKE.duration_s:g} s at {SMOKE.rate:g} req/s, a fault every "
        f"{SMOKE.gap_s[0]:g}–{SMOKE.gap_s[1]:g} s",
    )
    parser.add_argument(
        "--no-durable",
        dest="durable",
        action="store_false",
        help="PostgreSQL without fsync (as the tests run it)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the data dir and logs")
    parser.add_argument(
        "--json", type=Path, default=RESULTS, help="where to write the results (default %(default)s)"
    )
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    base = SMOKE if args.smoke else Options(duration_s=args.duration, rate=args.rate, wallets=args.wallets)
    if base.rate <= 0 or base.duration_s <= 0 or base.wallets < 1:
        _parser().error("--rate and --duration must be positive, --wallets at least 1")
    options = dataclasses.replace(
        base, seed=args.seed, kill_envoy=args.kill_envoy, durable=args.durable, keep=args.keep
    )
    chaos = Chaos(options, say=lambda m: print(m, flush=True))

    async def run() -> dict[str, Any]:
        try:
            return await chaos.run()
        finally:
            await chaos.stop()

    try:
        results = asyncio.run(run())
    except Exception as exc:  # noqa: BLE001 (the stack did not start: say why, as `make bench` does)
        print(f"bench --chaos: could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    results["environment"] = runner.environment()
    print(render(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {args.json}")
    return 0 if results["exact"] else 1
