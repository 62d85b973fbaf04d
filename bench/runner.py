"""One benchmark run: start the real stack, load it billed and unbilled, check the books.

What runs (all on loopback, on this machine):

- the local stack exactly as ``billingproxy up`` starts it (:class:`billingproxy.devstack.local_stack.Stack`):
  embedded PostgreSQL in a throw-away data dir (or ``DATABASE_URL``), migrations, the demo
  backend, the sidecar, and Envoy with billing (ext_authz over HTTP to the sidecar's Check port +
  Lua usage filter + gRPC access log);
- a second Envoy, the **baseline**: the same rendered configuration with the ext_authz filter,
  the Lua filters and the gRPC access log removed, in front of the same demo backend;
- a third, the **Lua baseline**: the baseline with the two Lua filters (usage_filter.lua,
  upstream_headers.lua) kept, and the metadata the Check would give them set by a static filter
  (``envoy.filters.http.set_metadata``), so the usage filter reads each answer as it does billed:
  what the Lua filters alone add to Envoy, against the baseline, in the same run;
- a billed Envoy with ext_authz's gRPC flavour (same sidecar).

All the Envoys use the default worker count (one per core); only one of them is loaded at a time.

Then, in order: the Check-input micro-benchmark (:mod:`bench.body_decode`: parsing Envoy's HTTP
Check request and its JSON body, on the idle machine), the sidecar's CPU by step
(:mod:`bench.sidecar_steps`: the real sidecar's HTTP Check and gRPC access log, driven as Envoy
drives them), warm-ups, closed-loop maximum-throughput runs (baseline, billed over many wallets,
billed on one hot wallet, the Lua baseline), open-loop runs at ``rate`` and at ``low_rate`` req/s
(baseline, billed, the Lua baseline at ``rate``), and the exactly-once check of every billed
request against the ledger. Each run waits for the machine to be quiet first (at most
``Options.quiet_wait_max_s``), and reports the CPU of every part, including anything else that
ran on the machine meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import datetime as dt
import importlib.metadata
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import httptools
import sqlalchemy as sa
import yaml
from sqlalchemy.ext.asyncio import AsyncEngine

from authz_sidecar import contract, envoy_config
from bench import body_decode, loadgen, procstat, sidecar_steps, workload
from billing import api_keys, audit, database, pricing, wallets
from billing.settings import Settings
from billing.usage import Format
from billingproxy.devstack import envoy_process
from billingproxy.devstack.local_stack import Stack, free_port, free_ports_env
from billingproxy.devstack.postgres_server import EmbeddedPostgres

GRANT_NANO = 1_000 * 10**9  # $1000 per wallet: far more than any run spends
SETTLE_TIMEOUT_S = 30.0
# Before each run, wait (at most Options.quiet_wait_max_s) until the machine is nearly idle: others may
# share it (a test suite, a build), and their CPU would be counted against the gateway.
QUIET_CORES_MAX = 0.25
QUIET_SAMPLE_S = 0.5


@dataclasses.dataclass(frozen=True)
class Options:
    duration_s: float = 10.0
    warmup_s: float = 2.0
    concurrency: int = 32
    rate: float = 500.0
    # A second fixed rate the billed gateway can sustain on this machine: latency without overload.
    low_rate: float = 100.0
    wallets: int = 100
    durable: bool = True
    keep: bool = False
    # The pairs the verdicts rest on (max: baseline and billed; the fixed rate: the same), run this
    # many times in all, interleaved; the verdicts take the median pair. One pair swings ±10 % here.
    repeats: int = 3
    # Before each run, wait at most this long for the machine to be quiet (0: measure at once).
    quiet_wait_max_s: float = 5.0
    # Sequential calls per step of the sidecar's CPU by step (bench.sidecar_steps).
    step_calls: int = sidecar_steps.CALLS
    # Timing target per function of the Check-input micro-benchmark (bench.body_decode).
    micro_target_s: float = body_decode.TARGET_S


# The runs the targets are judged on, repeated (Options.repeats) and interleaved; with the Lua
# baseline's, whose ratio to the baseline is a few per cent, below one pair's noise.
REPEATED_RUNS = ("baseline_max", "billed_max", "baseline_lua_max", "baseline_fixed", "billed_fixed")
# The Envoy that serves a run, when it is not the one its name says (billed: "envoy", else the
# baseline): its CPU is the run's Envoy CPU.
ENVOY_OF_RUN = {
    "billed_max_grpc_check": "envoy_grpc_check",
    "billed_fixed_free": "envoy",
    "baseline_lua_max": "envoy_lua",
    "baseline_lua_fixed": "envoy_lua",
}


# --- the baseline Envoy ----------------------------------------------------------------------------


# What the Check hands the Lua filters for the workload (a non-streamed chat completion), set on
# the Lua baseline by a static filter in ext_authz's place.
LUA_BASELINE_METADATA = {
    "name": "envoy.filters.http.set_metadata",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
        "metadata": [
            {
                "metadata_namespace": envoy_config.EXT_AUTHZ_FILTER,
                "value": {contract.FORMAT: Format.OPENAI_CHAT.value},
            }
        ],
    },
}


def baseline_config(
    settings: Settings, *, backend_url: str, admin_socket: Path, lua: bool = False
) -> dict[str, Any]:
    """The billed gateway's Envoy config without ext_authz and the gRPC access log, and without the
    Lua filters unless ``lua`` (then ext_authz's place holds ``LUA_BASELINE_METADATA``)."""
    config = copy.deepcopy(envoy_config.render(settings, backend_url=backend_url, admin_socket=admin_socket))
    removed = {envoy_config.EXT_AUTHZ_FILTER}
    if not lua:
        removed |= {envoy_config.LUA_FILTER, envoy_config.UPSTREAM_HEADERS_FILTER}
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                hcm = network_filter["typed_config"]
                kept = []
                for http_filter in hcm["http_filters"]:
                    if lua and http_filter["name"] == envoy_config.EXT_AUTHZ_FILTER:
                        kept.append(LUA_BASELINE_METADATA)
                    elif http_filter["name"] not in removed:
                        kept.append(http_filter)
                hcm["http_filters"] = kept
                hcm["access_log"] = [
                    a for a in hcm["access_log"] if a["name"] != "envoy.access_loggers.http_grpc"
                ]
                for vhost in hcm["route_config"]["virtual_hosts"]:
                    for route in vhost["routes"]:
                        per_filter = route.get("typed_per_filter_config", {})
                        for name in removed:
                            per_filter.pop(name, None)
                        if "typed_per_filter_config" in route and not per_filter:
                            del route["typed_per_filter_config"]
    return config


# --- measuring one load run ------------------------------------------------------------------------


@dataclasses.dataclass
class Pids:
    sidecar: int | None
    envoy: int | None
    envoy_baseline: int | None
    envoy_lua: int | None  # the baseline with the Lua filters
    envoy_grpc_check: int | None  # the billed gateway with ext_authz's gRPC flavour
    backend: int | None
    postgres: int | None  # the postmaster; its backends are its children
    others: tuple[int, ...] = ()  # the stack's other children (the Stripe test double…), idle here

    def all(self) -> set[int]:
        named = (
            self.sidecar,
            self.envoy,
            self.envoy_baseline,
            self.envoy_lua,
            self.envoy_grpc_check,
            self.backend,
            self.postgres,
        )
        return {pid for pid in named if pid is not None} | set(self.others)


@dataclasses.dataclass(frozen=True)
class _CpuSnapshot:
    seconds: dict[str, float]  # by part, the machine's (machine_*), and the wall clock (wall)
    processes: dict[int, tuple[int, float]]  # procstat.all_processes()


def _cpu_snapshot(pids: Pids) -> _CpuSnapshot:
    sidecar_user, sidecar_system = procstat.cpu_split_seconds(pids.sidecar)
    snapshot = {
        "sidecar": sidecar_user + sidecar_system,
        "sidecar_user": sidecar_user,
        "sidecar_system": sidecar_system,
        "envoy": procstat.cpu_seconds(pids.envoy),
        "envoy_baseline": procstat.cpu_seconds(pids.envoy_baseline),
        "envoy_lua": procstat.cpu_seconds(pids.envoy_lua),
        "envoy_grpc_check": procstat.cpu_seconds(pids.envoy_grpc_check),
        "backend": procstat.cpu_seconds(pids.backend),
        "postgres": procstat.tree_cpu_seconds(pids.postgres),
    }
    snapshot.update({f"machine_{k}": v for k, v in procstat.machine_seconds().items()})
    snapshot["wall"] = time.perf_counter()
    return _CpuSnapshot(snapshot, procstat.all_processes())


def _cpu_delta(before: _CpuSnapshot, after: _CpuSnapshot, pids: Pids) -> dict[str, float]:
    ours = {os.getpid()} | pids.all()
    delta = {name: after.seconds[name] - before.seconds[name] for name in before.seconds}
    # Anyone else's CPU in the meantime (a test suite on the same machine…): it disturbs the run.
    delta["foreign"] = procstat.foreign_cpu_seconds(before.processes, after.processes, ours)
    return delta


async def _scrape_counters(session: aiohttp.ClientSession, admin_port: int) -> dict[str, dict[str, float]]:
    """The sidecar's Check decisions and settlement outcomes, by label, from /metrics."""
    async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as response:
        text = await response.text()
    found: dict[str, dict[str, float]] = {"check_decisions": {}, "settlements": {}}
    for line in text.splitlines():
        for name, by_label in found.items():
            prefix = f"billingproxy_{name}_total{{"
            if line.startswith(prefix):
                label = line[len(prefix) : line.index("}")].split("=", 1)[1].strip('"')
                by_label[label] = float(line.rsplit(" ", 1)[1])
    return found


async def _scrape_check_seconds(session: aiohttp.ClientSession, admin_port: int) -> tuple[float, float]:
    """(sum, count) of the sidecar's Check latency histogram."""
    async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as response:
        text = await response.text()
    values = {}
    for line in text.splitlines():
        for name in ("billingproxy_check_duration_seconds_sum", "billingproxy_check_duration_seconds_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values.get("billingproxy_check_duration_seconds_sum", 0.0), values.get(
        "billingproxy_check_duration_seconds_count", 0.0
    )


async def discard_data_dir(data_dir: Path, postgres: EmbeddedPostgres | None, *, own_postgres: bool) -> None:
    """Delete a run's data dir, and with ``own_postgres`` the embedded cluster the Stack ran in it.

    As root the cluster may live in a temp folder outside the data dir (a pointer file names
    it); destroy() finds it, also when the stack failed to start and forgot it (``postgres`` None).
    """
    if own_postgres:
        postgres = postgres or EmbeddedPostgres(data_dir / "postgres")
        with contextlib.suppress(Exception):
            await asyncio.to_thread(postgres.destroy)
    shutil.rmtree(data_dir, ignore_errors=True)


async def create_wallets(engine: AsyncEngine, count: int) -> list[tuple[str, str]]:
    """``count`` wallets of GRANT_NANO each, one API key each, straight in the database:
    (wallet id, API key) pairs."""
    created = []
    async with engine.begin() as conn:
        for n in range(count):
            wallet = await wallets.create_wallet(
                conn, source="admin", grant_nano=GRANT_NANO, external_id=f"bench-{os.getpid()}-{n}"
            )
            issued = await api_keys.issue_key(conn, wallet_id=wallet.id, source="admin")
            created.append((wallet.id, issued.plaintext))
    return created


class Bench:
    def __init__(self, options: Options, say: Callable[[str], object] = print) -> None:
        self.options = options
        self.say = say
        self.data_dir = Path(tempfile.mkdtemp(prefix="billingproxy-bench-"))
        # Set by start(); stop() stops what was started. The properties below are for after start().
        self._stack: Stack | None = None
        self.baseline: envoy_process.EnvoyProcess | None = None
        self.lua_baseline: envoy_process.EnvoyProcess | None = None
        self.grpc_check: envoy_process.EnvoyProcess | None = None
        self._engine: AsyncEngine | None = None
        self._pids: Pids | None = None
        self.wallet_ids: list[str] = []
        self.authorizations: list[str] = []
        # x-request-ids of the billed gateway's answers, warm-ups included: 2xx, and the rest.
        self.billed_ids_ok: list[str] = []
        self.billed_ids_other: list[str] = []
        self.billed_denied: dict[int, int] = {}
        self.results: dict[str, Any] = {}

    @property
    def stack(self) -> Stack:
        assert self._stack is not None, "Bench.start() first"
        return self._stack

    @property
    def engine(self) -> AsyncEngine:
        assert self._engine is not None, "Bench.start() first"
        return self._engine

    @property
    def pids(self) -> Pids:
        assert self._pids is not None, "Bench.start() first"
        return self._pids

    # -- set-up and tear-down --

    def _env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("BILLINGPROXY_")
        }  # never a real backend, never the user's ports
        env.update(
            {
                "BILLINGPROXY_DATA_DIR": str(self.data_dir),
                **free_ports_env(),
            }
        )
        return env

    async def start(self) -> None:
        self._stack = Stack(self._env(), say=lambda m: self.say(f"  {m}"), durable=self.options.durable)
        await self.stack.start()
        settings = self.stack.settings
        run_dir = settings.data_dir.absolute() / "run"
        self.baseline, self.baseline_url = self._baseline_envoy(
            "baseline", lua=False, what="the baseline Envoy (no ext_authz, no Lua, no gRPC access log)"
        )
        await self.baseline.start()
        self.lua_baseline, self.lua_baseline_url = self._baseline_envoy(
            "lua-baseline", lua=True, what="the Lua baseline Envoy (the baseline with the two Lua filters)"
        )
        await self.lua_baseline.start()
        # The same billed gateway with ext_authz's other flavour (the gRPC Check, same sidecar):
        # BILLINGPROXY_CHECK_TRANSPORT measured against the default in the same run.
        grpc_settings = self._side_envoy_settings("grpc-check").replace(check_transport="grpc")
        self.say(f"  starting a billed Envoy with the gRPC Check on :{grpc_settings.gateway_port}…")
        self.grpc_check = envoy_process.EnvoyProcess(
            envoy_config.render_yaml(
                grpc_settings,
                backend_url=self.stack.backend_url,
                admin_socket=run_dir / "envoy-grpc-check-admin.sock",
            ),
            base_id=None,
            log_path=settings.data_dir / "run" / "envoy-grpc-check.log",
            file_flush_interval_ms=envoy_config.FILE_FLUSH_INTERVAL_MS,
        )
        await self.grpc_check.start()
        self.grpc_check_url = f"http://127.0.0.1:{grpc_settings.gateway_port}"
        self._engine = database.create_engine(self.stack.database_url, pool_size=2)
        pids = self.stack.process_ids()
        self._pids = Pids(
            sidecar=pids.pop("sidecar", None),
            envoy=pids.pop("envoy", None),
            envoy_baseline=self.baseline.pid,
            envoy_lua=self.lua_baseline.pid,
            envoy_grpc_check=self.grpc_check.pid,
            backend=pids.pop("demo backend", None),
            postgres=pids.pop("postgres", None),
            others=tuple(pids.values()),
        )

    def _baseline_envoy(self, name: str, *, lua: bool, what: str) -> tuple[envoy_process.EnvoyProcess, str]:
        """A baseline Envoy (see ``baseline_config``) on a free port, not started yet, and its URL."""
        settings = self._side_envoy_settings(name)
        run_dir = self.stack.settings.data_dir.absolute() / "run"
        config = baseline_config(
            settings,
            backend_url=self.stack.backend_url,
            admin_socket=run_dir / f"envoy-{name}-admin.sock",
            lua=lua,
        )
        self.say(f"  starting {what} on :{settings.gateway_port}…")
        process = envoy_process.EnvoyProcess(
            yaml.safe_dump(config, sort_keys=False),
            base_id=None,
            log_path=run_dir / f"envoy-{name}.log",
            file_flush_interval_ms=envoy_config.FILE_FLUSH_INTERVAL_MS,
        )
        return process, f"http://127.0.0.1:{settings.gateway_port}"

    def _side_envoy_settings(self, name: str) -> Settings:
        """The stack's settings for another Envoy beside it: a free port, and a data dir of its
        own, so its JSON access-log file is its own (the stack's sidecar follows and rotates only
        the stack Envoy's, and asks only that Envoy to reopen it)."""
        data_dir = self.stack.settings.data_dir.absolute() / "side-envoys" / name
        settings = self.stack.settings.replace(gateway_port=free_port(), data_dir=data_dir)
        settings.access_log_path.parent.mkdir(parents=True, exist_ok=True)
        return settings

    async def stop(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
        if self.baseline is not None:
            await self.baseline.stop()
        if self.lua_baseline is not None:
            await self.lua_baseline.stop()
        if self.grpc_check is not None:
            await self.grpc_check.stop()
        postgres = self._stack.embedded_postgres if self._stack is not None else None
        if self._stack is not None:
            await self._stack.stop()
        if self.options.keep:
            self.say(f"  kept the data and logs in {self.data_dir}")
            return
        own_postgres = self._stack is not None and not os.environ.get("DATABASE_URL")
        await discard_data_dir(self.data_dir, postgres, own_postgres=own_postgres)

    async def create_wallets(self) -> None:
        """``options.wallets`` wallets with $1000 each and one key each, straight in the database."""
        for wallet_id, api_key in await create_wallets(self.engine, self.options.wallets):
            self.wallet_ids.append(wallet_id)
            self.authorizations.append(f"Bearer {api_key}")

    # -- runs --

    def billed_target(self, *, single_wallet: bool = False, grpc_check: bool = False) -> loadgen.Target:
        keys = self.authorizations[:1] if single_wallet else self.authorizations
        gateway = self.grpc_check_url if grpc_check else self.stack.gateway_url
        return loadgen.Target(gateway + workload.PATH, workload.BODY, keys)

    def baseline_target(self, *, free: bool = False, lua: bool = False) -> loadgen.Target:
        # The baseline has no ext_authz: the client's key would reach the backend, so send none.
        url = self.lua_baseline_url if lua else self.baseline_url
        if free:
            return loadgen.Target(url + workload.FREE_PATH, b"", (), workload.FREE_METHOD)
        return loadgen.Target(url + workload.PATH, workload.BODY, ())

    def free_target(self) -> loadgen.Target:
        """The billed gateway, with requests whose Check needs no database (workload.FREE_PATH)."""
        return loadgen.Target(
            self.stack.gateway_url + workload.FREE_PATH, b"", self.authorizations, workload.FREE_METHOD
        )

    def _count_billed(self, run: loadgen.Run) -> None:
        self.billed_ids_ok.extend(run.request_ids_ok)
        self.billed_ids_other.extend(run.request_ids_other)
        for status, n in run.statuses.items():
            if not 200 <= status < 300:
                self.billed_denied[status] = self.billed_denied.get(status, 0) + n

    async def pending_holds(self, request_ids: list[str]) -> int:
        async with self.engine.connect() as conn:
            pending: int = (
                await conn.execute(
                    sa.text("SELECT count(*) FROM holds WHERE state = 'pending' AND request_id = ANY(:ids)"),
                    {"ids": request_ids},
                )
            ).scalar_one()
        return pending

    async def wait_settled(self, request_ids: list[str]) -> float | None:
        """Seconds until the holds of these answered requests are settled (their access-log
        entries arrived and were posted), or None after SETTLE_TIMEOUT_S."""
        started = time.perf_counter()
        while time.perf_counter() - started < SETTLE_TIMEOUT_S:
            if await self.pending_holds(request_ids) == 0:
                return time.perf_counter() - started
            await asyncio.sleep(0.02)
        return None

    async def wait_quiet(self) -> tuple[float, float]:
        """(seconds waited, busy cores in the last sample) once the machine is quiet, or after
        ``quiet_wait_max_s`` (one sample, at most QUIET_SAMPLE_S, whatever it says)."""
        started = time.perf_counter()
        sample_s = min(QUIET_SAMPLE_S, max(self.options.quiet_wait_max_s, 0.05))
        while True:
            before = procstat.machine_seconds()["busy"]
            await asyncio.sleep(sample_s)
            cores = (procstat.machine_seconds()["busy"] - before) / sample_s
            waited = time.perf_counter() - started
            if cores <= QUIET_CORES_MAX or waited >= self.options.quiet_wait_max_s:
                if cores > QUIET_CORES_MAX:
                    self.say(
                        f"  the machine is still busy ({cores:.2f} cores) after {waited:.0f} s; measuring "
                        "anyway"
                    )
                return waited, cores

    async def measured(
        self, run_coro: Awaitable[loadgen.Run], *, billed: bool, envoy: str | None = None
    ) -> dict[str, Any]:
        """Run a load, then (billed) wait for its settlements; CPU counted over both."""
        waited, background = await self.wait_quiet()
        admin_port = self.stack.settings.admin_port
        async with aiohttp.ClientSession() as admin:
            check0 = await _scrape_check_seconds(admin, admin_port) if billed else None
            cpu0 = _cpu_snapshot(self.pids)
            run: loadgen.Run = await run_coro
            settle_s = await self.wait_settled(run.request_ids_ok) if billed else None
            cpu1 = _cpu_snapshot(self.pids)
            check1 = await _scrape_check_seconds(admin, admin_port) if billed else None
        if billed:
            self._count_billed(run)
        cpu = _cpu_delta(cpu0, cpu1, self.pids)
        ok = max(run.ok, 1)
        wall = cpu.pop("wall")
        foreign = cpu.pop("foreign")
        machine = {k.removeprefix("machine_"): cpu.pop(k) for k in list(cpu) if k.startswith("machine_")}
        cpu["generator"] = run.generator_cpu_s
        envoy = envoy or ("envoy" if billed else "envoy_baseline")
        measured = cpu["sidecar"] + cpu[envoy] + cpu["backend"] + cpu["postgres"] + cpu["generator"]
        result = run.summary()
        result["envoy_process"] = envoy  # which Envoy served this run (its CPU is the row's)
        result["wall_s"] = round(wall, 3)
        result["background_cores_before"] = round(background, 3)
        result["waited_for_quiet_s"] = round(waited, 1)
        result["cpu_s"] = {k: round(v, 3) for k, v in cpu.items()}
        result["cpu_us_per_request"] = {k: round(v / ok * 1e6, 1) for k, v in cpu.items()}
        result["machine_cores"] = {k: round(v / wall, 3) for k, v in machine.items() if k != "idle"}
        result["machine_cores"]["other_processes"] = round(foreign / wall, 3)
        # Kernel work not charged to any process (loopback softirq, …), and short-lived processes.
        result["machine_cores"]["unattributed"] = round((machine["busy"] - measured - foreign) / wall, 3)
        result["machine_cores_busy"] = round(machine["busy"] / wall, 2)
        if billed:
            assert check0 is not None and check1 is not None
            result["settle_lag_s"] = None if settle_s is None else round(settle_s, 3)
            checks = check1[1] - check0[1]
            result["sidecar_check_mean_ms"] = (
                round((check1[0] - check0[0]) / checks * 1000, 3) if checks else None
            )
        return result

    async def run_all(self) -> dict[str, Any]:
        o = self.options
        self.say(
            "Check-input micro-benchmark "
            f"(HTTP request parsed with httptools {httptools.__version__}, JSON body)…"
        )
        self.results["body_decode"] = await asyncio.to_thread(body_decode.run, target_s=o.micro_target_s)

        self.results["host_speed_ms"] = {"start": await asyncio.to_thread(host_speed_ms)}
        self.say("starting the stack…")
        await self.start()
        await self.create_wallets()
        self.say(f"  {o.wallets} wallets with $1000 each")
        self.results["sidecar_rss_kib_at_start"] = procstat.memory_kib(self.pids.sidecar, "VmRSS")

        self.say(f"sidecar CPU by step ({o.step_calls} sequential calls each)…")
        await self.wait_quiet()
        settings = self.stack.settings
        self.results["sidecar_steps"] = await sidecar_steps.Steps(
            engine=self.engine,
            database_url=self.stack.database_url,
            grpc_port=settings.grpc_port,
            check_port=settings.check_port,
            sidecar_pid=self.pids.sidecar,
            prices=pricing.load(settings.price_overrides_path, settings.markup_percent),
            access_log_secret=settings.access_log_secret,
            calls=o.step_calls,
        ).run()

        self.say(f"warming up both gateways ({o.warmup_s:.0f} s each)…")
        await loadgen.closed_loop(
            "warmup-baseline", self.baseline_target(), concurrency=o.concurrency, duration_s=o.warmup_s
        )
        await loadgen.closed_loop(
            "warmup-lua-baseline",
            self.baseline_target(lua=True),
            concurrency=o.concurrency,
            duration_s=o.warmup_s / 2,
        )
        warm = await loadgen.closed_loop(
            "warmup-billed", self.billed_target(), concurrency=o.concurrency, duration_s=o.warmup_s
        )
        self._count_billed(warm)
        warm = await loadgen.closed_loop(
            "warmup-grpc-check",
            self.billed_target(grpc_check=True),
            concurrency=o.concurrency,
            duration_s=o.warmup_s / 2,
        )
        self._count_billed(warm)
        await self.wait_settled(warm.request_ids_ok)

        runs: dict[str, Any] = {}
        plan: list[tuple[str, bool, Callable[[], Awaitable[loadgen.Run]]]] = [
            (
                "baseline_max",
                False,
                lambda: loadgen.closed_loop(
                    "baseline, max",
                    self.baseline_target(),
                    concurrency=o.concurrency,
                    duration_s=o.duration_s,
                ),
            ),
            (
                "baseline_lua_max",
                False,
                lambda: loadgen.closed_loop(
                    "baseline + Lua, max",
                    self.baseline_target(lua=True),
                    concurrency=o.concurrency,
                    duration_s=o.duration_s,
                ),
            ),
            (
                "billed_max",
                True,
                lambda: loadgen.closed_loop(
                    f"billed, max, {o.wallets} wallets",
                    self.billed_target(),
                    concurrency=o.concurrency,
                    duration_s=o.duration_s,
                ),
            ),
            (
                "billed_max_one_wallet",
                True,
                lambda: loadgen.closed_loop(
                    "billed, max, 1 wallet",
                    self.billed_target(single_wallet=True),
                    concurrency=o.concurrency,
                    duration_s=o.duration_s,
                ),
            ),
            (
                "billed_max_grpc_check",
                True,
                lambda: loadgen.closed_loop(
                    "billed, max, gRPC Check",
                    self.billed_target(grpc_check=True),
                    concurrency=o.concurrency,
                    duration_s=o.duration_s,
                ),
            ),
            (
                "baseline_fixed",
                False,
                lambda: loadgen.open_loop(
                    f"baseline, {o.rate:.0f}/s", self.baseline_target(), rate=o.rate, duration_s=o.duration_s
                ),
            ),
            (
                "baseline_lua_fixed",
                False,
                lambda: loadgen.open_loop(
                    f"baseline + Lua, {o.rate:.0f}/s",
                    self.baseline_target(lua=True),
                    rate=o.rate,
                    duration_s=o.duration_s,
                ),
            ),
            (
                "billed_fixed",
                True,
                lambda: loadgen.open_loop(
                    f"billed, {o.rate:.0f}/s", self.billed_target(), rate=o.rate, duration_s=o.duration_s
                ),
            ),
            (
                "baseline_fixed_free",
                False,
                lambda: loadgen.open_loop(
                    f"baseline, {o.rate:.0f}/s, GET {workload.FREE_PATH}",
                    self.baseline_target(free=True),
                    rate=o.rate,
                    duration_s=o.duration_s,
                ),
            ),
            (
                "billed_fixed_free",
                False,
                lambda: loadgen.open_loop(
                    f"billed, {o.rate:.0f}/s, GET {workload.FREE_PATH}",
                    self.free_target(),
                    rate=o.rate,
                    duration_s=o.duration_s,
                ),
            ),
            (
                "baseline_low",
                False,
                lambda: loadgen.open_loop(
                    f"baseline, {o.low_rate:.0f}/s",
                    self.baseline_target(),
                    rate=o.low_rate,
                    duration_s=o.duration_s,
                ),
            ),
            (
                "billed_low",
                True,
                lambda: loadgen.open_loop(
                    f"billed, {o.low_rate:.0f}/s",
                    self.billed_target(),
                    rate=o.low_rate,
                    duration_s=o.duration_s,
                ),
            ),
        ]
        for key, billed, make in plan:
            self.say(f"run: {key} ({o.duration_s:g} s)…")
            # The free runs go through the billed Envoy but charge nothing (billed=False: no books).
            runs[key] = await self.measured(make(), billed=billed, envoy=ENVOY_OF_RUN.get(key))
            r = runs[key]
            self.say(
                f"  {r['rps']:.0f} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
                f"non-2xx {sum(v for s, v in r['statuses'].items() if not s.startswith('2'))}, "
                f"errors {sum(r['errors'].values())}"
            )
        self.results["runs"] = runs
        by_key = {key: (billed, make) for key, billed, make in plan}
        repeated: list[dict[str, Any]] = []
        for n in range(2, o.repeats + 1):
            pair: dict[str, Any] = {}
            for key in REPEATED_RUNS:
                billed, make = by_key[key]
                self.say(f"run: {key}, again ({n} of {o.repeats})…")
                pair[key] = await self.measured(make(), billed=billed, envoy=ENVOY_OF_RUN.get(key))
                self.say(
                    f"  {pair[key]['rps']:.0f} req/s, p50 {pair[key]['p50_ms']} ms, p99 "
                    f"{pair[key]['p99_ms']} ms"
                )
            repeated.append(pair)
        self.results["repeats"] = repeated
        self.results["host_speed_ms"]["end"] = await asyncio.to_thread(host_speed_ms)
        self.results["sidecar_peak_rss_kib"] = procstat.memory_kib(self.pids.sidecar, "VmHWM")
        self.results["sidecar_rss_kib_at_end"] = procstat.memory_kib(self.pids.sidecar, "VmRSS")

        self.say("checking that every billed request was charged exactly once…")
        self.results["exactly_once"] = await self.check_books()
        async with aiohttp.ClientSession() as admin:
            self.results["sidecar_counters"] = await _scrape_counters(admin, self.stack.settings.admin_port)
        return self.results

    # -- the books --

    async def check_books(self) -> dict[str, Any]:
        """Every 2xx answer of the billed gateway has exactly one usage entry, of exactly the
        price-table cost; nothing else was charged; no hold is left pending; the books balance."""
        settled_in = await self.wait_settled(self.billed_ids_ok)
        # Envoy logs a request it refused after the ext_authz timeout too; the sidecar voids its
        # late hold by request id. Give those entries a moment.
        deadline = time.perf_counter() + 5
        while await self.pending_holds(self.billed_ids_other) and time.perf_counter() < deadline:
            await asyncio.sleep(0.1)
        settings = self.stack.settings
        prices = pricing.load(settings.price_overrides_path, settings.markup_percent)
        expected_cost = workload.cost_nano(prices)
        async with self.engine.connect() as conn:
            ids = {"ids": self.wallet_ids}
            usage = (
                await conn.execute(
                    sa.text(
                        "SELECT idempotency_key, amount_nano FROM ledger_entries "
                        "WHERE kind = 'usage' AND wallet_id = ANY(:ids)"
                    ),
                    ids,
                )
            ).all()
            holds: dict[str, str] = dict(
                (
                    await conn.execute(
                        sa.text("SELECT request_id, state FROM holds WHERE wallet_id = ANY(:ids)"), ids
                    )
                ).all()
            )
        problems = (await audit.run(self.engine)).findings
        ok_ids, other_ids = set(self.billed_ids_ok), set(self.billed_ids_other)
        charged = {key.removeprefix("usage:") for key, _ in usage}
        amounts: dict[str, int] = {}
        for _, amount in usage:
            amounts[str(-amount)] = amounts.get(str(-amount), 0) + 1
        states: dict[str, int] = {}
        for state in holds.values():
            states[state] = states.get(state, 0) + 1
        pending = {rid for rid, state in holds.items() if state == "pending"}
        result: dict[str, Any] = {
            "billed_2xx_answers": len(self.billed_ids_ok),
            "billed_non_2xx_answers": self.billed_denied,
            "usage_entries": len(usage),
            "answered_2xx_not_charged": len(ok_ids - charged),
            "charged_without_2xx_answer": len(charged - ok_ids),
            "duplicate_request_ids": len(self.billed_ids_ok) - len(ok_ids),
            "answered_2xx_hold_not_posted": sum(1 for rid in ok_ids if holds.get(rid) != "posted"),
            "holds_by_state": states,
            "pending_holds": len(pending),
            # Holds of requests Envoy refused with 503 after its ext_authz timeout: the sidecar
            # voids a late hold by request id when that 503 is logged, but a hold placed after
            # its void stays pending until the TTL sweep releases it (nothing is charged).
            "pending_holds_of_refused_requests": len(pending & other_ids),
            "expected_cost_nano": expected_cost,
            "charged_amounts_nano": amounts,
            "invariant_violations": [str(p) for p in problems],
            "settled_within_s": None if settled_in is None else round(settled_in, 3),
        }
        result["charged_exactly_once"] = (
            result["answered_2xx_not_charged"] == 0
            and result["charged_without_2xx_answer"] == 0
            and result["duplicate_request_ids"] == 0
            and result["answered_2xx_hold_not_posted"] == 0
            and set(amounts) == {str(expected_cost)}
            and not problems
        )
        result["ok"] = result["charged_exactly_once"] and not pending
        return result


def environment() -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "aiohttp": aiohttp.__version__,
        "grpcio": grpc.__version__,  # the access log (ALS)
        "httptools": httptools.__version__,  # the Check
        "uvloop": importlib.metadata.version("uvloop"),
        "envoy": _envoy_version(),
    }


def _envoy_version() -> str:
    """What ``envoy --version`` says (not the binary's path: results are committed)."""
    done = subprocess.run(
        [str(envoy_process.envoy_binary()), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    words = done.stdout.split()  # "envoy  version: <commit>/<version>/Clean/RELEASE/BoringSSL"
    parts = words[-1].split("/") if words else []
    return parts[1] if len(parts) > 1 else "unknown"


# A fixed piece of pure-Python work, timed on the process's CPU clock at the start and at the end
# of the run: on a shared host the same work takes more CPU when the machine under the virtual
# one is busy (shared caches and cores), which no process list shows. Compare runs by it.
_CALIBRATION_N = 2_000_000


def host_speed_ms() -> float:
    """CPU milliseconds for the fixed calibration work (lower is a faster host right now)."""
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        total = 0
        for i in range(_CALIBRATION_N):
            total += i & 7
        best = min(best, time.process_time() - started)
    return round(best * 1000, 1)
