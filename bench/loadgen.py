"""The load generator: asyncio + aiohttp, keep-alive connections, bounded concurrency.

Two shapes of load:

- **closed loop** (``closed_loop``): ``concurrency`` workers each send a request, wait for the
  answer, send the next, until the deadline. Measures the maximum throughput; latency at
  saturation is mostly queueing.
- **open loop** (``open_loop``): requests start on a fixed schedule (``rate`` per second)
  whether or not earlier ones have finished, so a slow answer cannot hold back the next request
  (no coordinated omission). Latency is measured from the *scheduled* start, so a generator or a
  gateway that falls behind shows up in the percentiles instead of being hidden.

The generator runs on the same two cores as Envoy, the sidecar, PostgreSQL and the backend, so
every run also reports the generator's own CPU time (``Run.generator_cpu_s``); the billed and
unbilled runs use the very same generator, so the comparison is fair even if the absolute numbers
are lower than a dedicated load machine would show.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import aiohttp


@dataclasses.dataclass(frozen=True)
class Target:
    """What every request of a run sends: one URL and body, keys taken round-robin."""

    url: str
    body: bytes
    authorizations: Sequence[str] = ()  # "Bearer sk-…" values; empty = no header
    method: str = "POST"

    def headers(self) -> Iterator[dict[str, str]] | None:
        if not self.authorizations:
            return None
        return itertools.cycle(
            [{"authorization": a, "content-type": "application/json"} for a in self.authorizations]
        )


@dataclasses.dataclass
class Run:
    name: str
    mode: str  # "closed" or "open"
    duration_s: float
    concurrency: int
    target_rate: float | None
    latencies_s: list[float]  # of successful (2xx) requests
    statuses: Counter[int]
    errors: Counter[str]  # connection-level failures by exception type
    generator_cpu_s: float
    late_starts: int = 0  # open loop: requests started > 1 ms after their scheduled time
    start_lags_s: list[float] = dataclasses.field(default_factory=list)  # open loop: start - schedule
    # Envoy's x-request-id of each answer (the hold and the usage entry are keyed by it).
    request_ids_ok: list[str] = dataclasses.field(default_factory=list)
    request_ids_other: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())

    @property
    def rps(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0

    def percentile_ms(self, p: float) -> float | None:
        return percentile(self.latencies_s, p) * 1000 if self.latencies_s else None

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "duration_s": round(self.duration_s, 3),
            "concurrency": self.concurrency,
            "target_rate": self.target_rate,
            "requests": self.total,
            "ok": self.ok,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(self.errors),
            "rps": round(self.rps, 1),
            "p50_ms": _round(self.percentile_ms(50)),
            "p90_ms": _round(self.percentile_ms(90)),
            "p99_ms": _round(self.percentile_ms(99)),
            "max_ms": _round(max(self.latencies_s) * 1000 if self.latencies_s else None),
            "generator_cpu_s": round(self.generator_cpu_s, 3),
            "generator_cpu_us_per_request": round(self.generator_cpu_s / self.total * 1e6, 1)
            if self.total
            else None,
            "late_starts": self.late_starts,
            "start_lag_p99_ms": _round(
                percentile(self.start_lags_s, 99) * 1000 if self.start_lags_s else None
            ),
        }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of unsorted values."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _session(concurrency: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=concurrency,
        limit_per_host=concurrency,
        keepalive_timeout=60,
        enable_cleanup_closed=False,
        ttl_dns_cache=None,
    )
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30), skip_auto_headers=("User-Agent",)
    )


async def closed_loop(name: str, target: Target, *, concurrency: int, duration_s: float) -> Run:
    """``concurrency`` workers, each one request at a time, for ``duration_s``."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    headers = target.headers()
    ids_ok: list[str] = []
    ids_other: list[str] = []
    async with _session(concurrency) as session:
        cpu0, t0 = time.process_time(), time.perf_counter()
        deadline = t0 + duration_s

        async def worker() -> None:
            perf = time.perf_counter
            while (start := perf()) < deadline:
                try:
                    async with session.request(
                        target.method,
                        target.url,
                        data=target.body or None,
                        headers=next(headers) if headers else None,
                    ) as response:
                        await response.read()
                        status = response.status
                        request_id = response.headers.get("x-request-id", "")
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    errors[type(exc).__name__] += 1
                    continue
                statuses[status] += 1
                if 200 <= status < 300:
                    latencies.append(perf() - start)
                    ids_ok.append(request_id)
                else:
                    ids_other.append(request_id)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return Run(
        name,
        "closed",
        elapsed,
        concurrency,
        None,
        latencies,
        statuses,
        errors,
        cpu,
        request_ids_ok=ids_ok,
        request_ids_other=ids_other,
    )


async def open_loop(
    name: str, target: Target, *, rate: float, duration_s: float, concurrency_max: int = 256
) -> Run:
    """Start ``rate`` requests per second on a fixed schedule for ``duration_s``.

    At most ``concurrency_max`` connections; if all are busy a request waits for one, and that
    wait counts in its latency.
    """
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    headers = target.headers()
    count = int(rate * duration_s)
    interval = 1.0 / rate
    late = 0
    lags: list[float] = []
    ids_ok: list[str] = []
    ids_other: list[str] = []
    async with _session(concurrency_max) as session:

        async def one(scheduled: float) -> None:
            start = time.perf_counter()
            lags.append(start - scheduled)
            try:
                async with session.request(
                    target.method,
                    target.url,
                    data=target.body or None,
                    headers=next(headers) if headers else None,
                ) as response:
                    await response.read()
                    status = response.status
                    request_id = response.headers.get("x-request-id", "")
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                errors[type(exc).__name__] += 1
                return
            statuses[status] += 1
            if 200 <= status < 300:
                latencies.append(time.perf_counter() - start)
                ids_ok.append(request_id)
            else:
                ids_other.append(request_id)

        tasks = []
        cpu0, t0 = time.process_time(), time.perf_counter()
        for n in range(count):
            scheduled = t0 + n * interval
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.001:
                late += 1
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*tasks)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    # The run lasts until its last answer, at least the schedule's length (overload stretches it).
    return Run(
        name,
        "open",
        max(elapsed, duration_s),
        concurrency_max,
        rate,
        latencies,
        statuses,
        errors,
        cpu,
        late,
        lags,
        ids_ok,
        ids_other,
    )
