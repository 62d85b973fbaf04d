"""`billingproxy up`: the whole gateway on one machine, from embedded defaults.

Starts, in order, each waiting until the previous one is ready: PostgreSQL (embedded, data kept
in ``<data_dir>/postgres``, unless DATABASE_URL is set) → migrations → the demo LLM backend
(unless BILLINGPROXY_BACKEND_URL names a real one) → the local Stripe test double (unless
STRIPE_SECRET_KEY is set; see docs/stripe.md) → the sidecar → Envoy. The children share one
environment, so the sidecar and the Envoy config read the same settings. Ctrl-C (or any child
but the sidecar dying) stops everything in reverse order.

The sidecar is supervised, as the kubelet supervises it in a pod: when it exits on its own (a
crash, the OOM killer, a SIGKILL), the Stack says so in one line ("the sidecar exited with status
-9; restarting in 0.5 s (restart 1)"), waits, starts it again with the same environment and
waits for its /readyz, as at start. The wait (:class:`RestartPolicy`) begins at 0.5 s and
doubles with each crash up to 10 s, so a sidecar that cannot start (its database is down: it
exits when it cannot open its pool) is retried a few times a minute, not in a tight loop; a
sidecar that ran 30 s or more before exiting starts again from 0.5 s. There is no give-up, as
in Kubernetes: the line each time, with its exit status, is what tells a person something is
wrong. While it is away Envoy refuses every metered request (503 ``billing_unavailable``;
ext_authz fails closed). Why only the sidecar: it is the one child that holds no state of its
own and that the fault tests kill; a demo backend, Stripe double, Envoy or PostgreSQL that dies
still stops ``up`` and names itself, so nothing limps on half-working unnoticed (PostgreSQL,
detached by pg_ctl, is watched through its pid file's process). The supervisor
is a task of the Stack, not of ``up``, so the tests get it too; :meth:`Stack.stop` ends it before
stopping any child, so no restart can race a stop.

Fault controls for the tests (:meth:`Stack.kill_sidecar`, :meth:`Stack.wait_sidecar_restarted`,
:meth:`Stack.restart_envoy`, :meth:`Stack.stop_postgres`, :meth:`Stack.start_postgres`) break
one part the way it breaks in production and bring it back at the same address, so the other
parts find it again by themselves. PostgreSQL's port is chosen once per Stack, not at each start,
for that reason: the sidecar's DATABASE_URL stays right across a restart.

The integration tests start the same :class:`Stack` with free ports, so what the README's
walk-through runs is what the tests run.

Who can reach what (docs/architecture.md, "Listeners"): Envoy's gateway port binds to
BILLINGPROXY_BIND_HOST; the sidecar's four ports, PostgreSQL, the demo backend and the Stripe
double listen on loopback only; Envoy's admin is a Unix socket in the run dir (mode 0600). Each
run makes a new access-log secret (Envoy sends it, the sidecar requires it); the files that hold
secrets — the rendered Envoy config, ``run/database_url`` (its password) — are mode 0600.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import aiohttp

from authz_sidecar import envoy_config
from billing import database, settings as settings_mod
from billing.settings import INTERNAL_HOST
from billingproxy.devstack import envoy_process
from billingproxy.devstack.mail_sink import MailSink
from billingproxy.devstack.postgres_server import EmbeddedPostgres, PostgresStartError

READY_TIMEOUT_S = 30.0
SIDECAR = "sidecar"
# How often the supervisor looks whether the sidecar still runs: how long a crash goes unnoticed.
_SUPERVISE_INTERVAL_S = 0.1


class StackError(RuntimeError):
    """A part of the stack failed to start; the message names the part, the cause and the fix."""


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_LISTEN_PORTS_FROM = 10_000
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, below the kernel's ephemeral range when there is room there.

    Why not simply bind port 0: that hands out an ephemeral port, and between this pick and the
    server's own bind any outgoing connection may take the same number (the storm tests open
    hundreds at once), so the server would fail to start. Below the range no outgoing connection
    ever lands."""
    high = _ephemeral_low() - 1
    for _ in range(200 if high > _LISTEN_PORTS_FROM else 0):
        port = random.randint(_LISTEN_PORTS_FROM, high)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        bound: int = sock.getsockname()[1]
        return bound


# Every port the stack listens on: its setting (BILLINGPROXY_<name>) and its Settings field.
PORTS = (
    ("GATEWAY_PORT", "gateway_port"),
    ("API_PORT", "api_port"),
    ("GRPC_PORT", "grpc_port"),
    ("CHECK_PORT", "check_port"),
    ("ADMIN_PORT", "admin_port"),
)
# Forwarded to the demo backend besides the allow-list: its test controls (demo_backend.py).
DEMO_UPSTREAM_HEADERS = "x-demo-*"


def reserve_setting_ports(settings: settings_mod.Settings) -> None:
    """The ports the settings name are the stack's own, even while still free (a test picks them
    before the stack binds them): :func:`free_port` never draws them for the helpers (PostgreSQL,
    the demo backend, the Stripe double), which would take Envoy's port before Envoy could."""
    _handed_out.update(getattr(settings, field) for _, field in PORTS)


def free_ports_env() -> dict[str, str]:
    """Every port setting set to a port free now: a stack that collides with nothing (tests, bench)."""
    return {f"{settings_mod.ENV_PREFIX}{name}": str(free_port()) for name, _ in PORTS}


def _run_dir(settings: settings_mod.Settings) -> Path:
    return settings.data_dir / "run"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def running_database_url(settings: settings_mod.Settings) -> str | None:
    """The URL of the database a running `billingproxy up` uses (for the admin commands)."""
    path = _run_dir(settings) / "database_url"
    return path.read_text().strip() if path.is_file() else None


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by its owner only (it holds a password or a secret)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(text)


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    """How long the Stack waits before restarting a sidecar that exited: the kubelet's
    CrashLoopBackOff, scaled down to a laptop (the kubelet: 10 s doubling to 5 min)."""

    first_delay_s: float = 0.5
    delay_max_s: float = 10.0
    # A sidecar that ran this long before exiting was not crash-looping: start again from the first delay.
    reset_after_s: float = 30.0

    def delay_s(self, previous_delay_s: float | None, uptime_s: float) -> float:
        """The wait before the next restart of a sidecar that ran ``uptime_s`` before exiting,
        when the restart before waited ``previous_delay_s`` (None: it never restarted)."""
        if previous_delay_s is None or uptime_s >= self.reset_after_s:
            return self.first_delay_s
        return min(previous_delay_s * 2, self.delay_max_s)


class Stack:
    """The processes of one gateway. ``env`` holds the settings (BILLINGPROXY_*, DATABASE_URL)."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        say: Callable[[str], object] = print,
        durable: bool = True,
        restart_policy: RestartPolicy = RestartPolicy(),
        mail_sink: bool = False,
    ) -> None:
        self.env = dict(env)
        # A new secret for each run: Envoy's rendered config and the sidecar's environment get it.
        self.env[f"{settings_mod.ENV_PREFIX}ACCESS_LOG_SECRET"] = secrets.token_urlsafe(32)
        self.settings = settings_mod.from_env(self.env)
        self._say = say
        self._durable = durable
        self.restart_policy = restart_policy
        self._postgres: EmbeddedPostgres | None = None
        # By name, in start order (stop() goes in reverse); a restarted sidecar keeps its place.
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._envoy: envoy_process.EnvoyProcess | None = None
        self._envoy_restarting = False
        self._postgres_stopped = False
        self._supervisor: asyncio.Task[None] | None = None
        self._sidecar_started_at = 0.0
        self._sidecar_ready = False
        self._sidecar_restarts = 0
        # Notified whenever the sidecar's restart count or readiness changes.
        self._sidecar_changed = asyncio.Condition()
        self.database_url = ""
        self.backend_url = ""
        # Set when no Stripe key is configured and the local test double was started instead.
        self.stripe_double_url = ""
        # With ``mail_sink`` and no BILLINGPROXY_SMTP_URL: the local server alert mail goes to.
        self._want_mail_sink = mail_sink
        self.mail_sink: MailSink | None = None

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.gateway_port}"

    @property
    def envoy(self) -> envoy_process.EnvoyProcess | None:
        """The running Envoy (its admin socket, config and log), once started."""
        return self._envoy

    @property
    def sidecar_restarts(self) -> int:
        """How many times the sidecar was found exited and (re)started, in all; never reset."""
        return self._sidecar_restarts

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    def _check_ports_free(self) -> None:
        """Fail before starting anything if a port we need is taken, naming its setting."""
        s = self.settings
        for setting, field in PORTS:
            port = getattr(s, field)
            host = s.bind_host if setting == "GATEWAY_PORT" else INTERNAL_HOST
            with socket.socket() as sock:
                # As the servers themselves do, so a port in TIME_WAIT does not count as taken.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind((host, port))
                except OSError:
                    raise StackError(
                        f"port {port} on {host} is taken by another process (BILLINGPROXY_{setting}); "
                        f"stop that process or set BILLINGPROXY_{setting} to a free port"
                    ) from None

    async def _start(self) -> None:
        s = self.settings
        self._check_ports_free()
        reserve_setting_ports(s)
        logs = _run_dir(s)
        logs.mkdir(parents=True, exist_ok=True)

        if s.database_url:
            self.database_url = s.database_url
            self._say("using the database at DATABASE_URL")
        else:
            self._say(f"starting PostgreSQL (data in {s.data_dir / 'postgres'})…")
            # A port of our choosing, not 0 (a new one at each start): see the module docstring.
            self._postgres = EmbeddedPostgres(
                s.data_dir / "postgres", port=free_port(), durable=self._durable
            )
            self.database_url = await asyncio.to_thread(self._postgres.start)
            _write_private(logs / "database_url", self.database_url + "\n")  # it carries the password
        self.env["DATABASE_URL"] = self.database_url

        self._say("applying database migrations…")
        await asyncio.to_thread(database.migrate, self.database_url)

        if s.backend_url:
            self.backend_url = s.backend_url
            self._say(f"LLM backend: {self.backend_url}")
        else:
            port = free_port()
            self._say(f"starting the demo LLM backend (OpenAI-compatible, exact usage) on 127.0.0.1:{port}…")
            self._spawn(
                "demo backend",
                [
                    sys.executable,
                    "-m",
                    "billingproxy.devstack.demo_backend",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                logs / "demo_backend.log",
            )
            self.backend_url = f"http://127.0.0.1:{port}"
            # Its test controls (x-demo-status, …) must pass Envoy's upstream allow-list.
            key = f"{settings_mod.ENV_PREFIX}UPSTREAM_HEADERS"
            self.env[key] = ",".join(filter(None, [self.env.get(key, ""), DEMO_UPSTREAM_HEADERS]))
            self.settings = s = settings_mod.from_env(self.env)
            # The demo requires BILLINGPROXY_BACKEND_API_KEY when set, as a real backend would.
            auth = {"authorization": f"Bearer {s.backend_api_key}"} if s.backend_api_key else {}
            await self._wait_http("demo backend", f"{self.backend_url}/v1/models", headers=auth)

        if s.stripe_configured:
            self._say(f"Stripe: top-ups through {s.stripe_api_base or 'api.stripe.com'}")
        else:
            await self._start_stripe_double(logs)

        if self._want_mail_sink and not s.smtp_url:
            s = await self._start_mail_sink()

        self._say(
            f"starting the sidecar (Check :{s.check_port}, gRPC :{s.grpc_port}, API :{s.api_port}, admin "
            f":{s.admin_port})…"
        )
        self._spawn_sidecar()
        await self._wait_http(SIDECAR, self._sidecar_readyz)
        self._sidecar_ready = True
        self._supervisor = asyncio.create_task(
            self._supervise_sidecar(), name=f"sidecar-supervisor:{s.admin_port}"
        )

        self._say(f"starting Envoy on {s.bind_host}:{s.gateway_port}…")
        config = envoy_config.render_yaml(s, backend_url=self.backend_url)
        # Envoy creates the file, not its folder. Owner only: the lines name wallets, keys and models.
        s.access_log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A dynamic base id lets several stacks (tests, benchmarks) run side by side.
        self._envoy = envoy_process.EnvoyProcess(
            config,
            base_id=None,
            log_path=logs / "envoy.log",
            file_flush_interval_ms=envoy_config.FILE_FLUSH_INTERVAL_MS,
        )
        await self._envoy.start()
        self._say(f"Envoy ready at {self.gateway_url}")

    async def _start_mail_sink(self) -> settings_mod.Settings:
        """No SMTP server configured: alert mail goes to a local sink that prints each mail."""
        self.mail_sink = MailSink(self.settings.data_dir.absolute() / "mail", say=self._say)
        await self.mail_sink.start()
        self.env[f"{settings_mod.ENV_PREFIX}SMTP_URL"] = self.mail_sink.url
        self.env.setdefault(f"{settings_mod.ENV_PREFIX}SMTP_FROM", "BillingProxy <billing@localhost>")
        self.settings = settings_mod.from_env(self.env)
        self._say(f"alert mail goes to a local mail sink at {self.mail_sink.url}…")
        return self.settings

    async def _start_stripe_double(self, logs: Path) -> None:
        """No Stripe key: a local test double (TEST MODE, loopback) so phase 4 works offline.

        Fresh random test credentials each run go to the sidecar's environment, the same as
        real test keys would; a real key in the environment means this never runs.
        """
        port = free_port()
        self.stripe_double_url = f"http://127.0.0.1:{port}"
        self.env.update(
            STRIPE_SECRET_KEY="sk_test_double_" + secrets.token_hex(16),
            STRIPE_WEBHOOK_SECRET="whsec_double_" + secrets.token_hex(24),
            STRIPE_API_BASE=self.stripe_double_url,
        )
        self.settings = settings_mod.from_env(self.env)
        host = self.settings.bind_host
        webhook_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        webhook_url = f"http://{webhook_host}:{self.settings.gateway_port}/stripe/webhook"
        self._say(f"starting the local Stripe test double (TEST MODE, no real money) on 127.0.0.1:{port}…")
        self._spawn(
            "stripe double",
            [
                sys.executable,
                "-m",
                "billingproxy.devstack.stripe_double",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--webhook-url",
                webhook_url,
            ],
            logs / "stripe_double.log",
        )
        await self._wait_http("stripe double", f"{self.stripe_double_url}/healthz")

    def _spawn(self, name: str, argv: list[str], log_path: Path) -> None:
        log = open(log_path, "ab")  # noqa: SIM115 (the child owns it; closed in stop())
        child = subprocess.Popen(
            argv,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C or hang-up reaches `up` alone, which stops the
            # children in order (Envoy flushes its access logs, then the sidecar settles them).
            start_new_session=True,
        )
        log.close()
        self._children[name] = child

    def _spawn_sidecar(self) -> None:
        self._spawn(
            SIDECAR,
            [sys.executable, "-m", "billingproxy", "sidecar"],
            _run_dir(self.settings) / "sidecar.log",
        )
        self._sidecar_started_at = time.monotonic()

    @property
    def _sidecar_readyz(self) -> str:
        return f"http://127.0.0.1:{self.settings.admin_port}/readyz"

    async def _supervise_sidecar(self) -> None:
        """Restart the sidecar whenever it exits, after the policy's wait; runs until cancelled
        (by stop()). Why polling: the children are plain Popen objects, reaped by ``poll()``, and a
        tenth of a second unnoticed is nothing beside the restart's own wait."""
        delay_s: float | None = None
        while True:
            child = self._children[SIDECAR]
            while child.poll() is None:
                await asyncio.sleep(_SUPERVISE_INTERVAL_S)
            delay_s = self.restart_policy.delay_s(delay_s, time.monotonic() - self._sidecar_started_at)
            async with self._sidecar_changed:
                self._sidecar_restarts += 1
                self._sidecar_ready = False
                self._sidecar_changed.notify_all()
            self._say(
                f"the sidecar exited with status {child.returncode}; restarting in {delay_s:g} s "
                f"(restart {self._sidecar_restarts})"
            )
            await asyncio.sleep(delay_s)
            self._spawn_sidecar()
            try:
                # No deadline: a live sidecar that is not ready (its database is down) is left to
                # become ready, as the kubelet leaves a pod whose readiness probe fails.
                await self._wait_http(SIDECAR, self._sidecar_readyz, timeout_s=None)
            except StackError:
                continue  # it exited while starting: the loop above sees it and waits longer
            async with self._sidecar_changed:
                self._sidecar_ready = True
                self._sidecar_changed.notify_all()
            self._say(f"the sidecar is back and ready (restart {self._sidecar_restarts})")

    async def _stop_supervising(self) -> None:
        """End the supervisor, so that nothing restarts the sidecar while it is being stopped."""
        task, self._supervisor = self._supervisor, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            self._say(f"the sidecar's supervisor had failed: {task.exception()!r}")

    async def _wait_http(
        self,
        name: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        *,
        timeout_s: float | None = READY_TIMEOUT_S,
    ) -> None:
        """Wait until ``url`` answers 200; StackError if the child ``name`` exits first or
        ``timeout_s`` passes (None: as long as the child runs)."""
        child = self._children.get(name)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while deadline is None or time.monotonic() < deadline:
                if child is not None and child.poll() is not None:
                    log = _run_dir(self.settings) / f"{name.replace(' ', '_')}.log"
                    raise StackError(
                        f"the {name} exited with status {child.returncode} while starting; "
                        f"last lines of {log}:\n{_tail(log)}"
                    )
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(
                        url, headers=headers, timeout=aiohttp.ClientTimeout(total=1)
                    ) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise StackError(f"the {name} was not ready at {url} within {timeout_s:.0f} s")

    def process_ids(self) -> dict[str, int]:
        """The running processes by part ("sidecar", "demo backend", "stripe double", "envoy",
        "postgres"), for tools that measure them (``make bench``)."""
        pids = {name: child.pid for name, child in self._children.items() if child.poll() is None}
        if self._envoy is not None and self._envoy.pid is not None:
            pids["envoy"] = self._envoy.pid
        if self._postgres is not None and self._postgres.postmaster_pid is not None:
            pids["postgres"] = self._postgres.postmaster_pid
        return pids

    @property
    def embedded_postgres(self) -> EmbeddedPostgres | None:
        return self._postgres

    def dead_child(self) -> str | None:
        """The name of a child that exited on its own and stays down, if any: not the sidecar,
        which the supervisor restarts (unless the supervisor itself has ended), nor an Envoy
        or PostgreSQL that a fault control stopped on purpose."""
        for name, child in self._children.items():
            if name != SIDECAR and child.poll() is not None:
                return name
        if self._supervisor is not None and self._supervisor.done():
            return SIDECAR
        if self._envoy is not None and not self._envoy.running and not self._envoy_restarting:
            return "Envoy"
        if self._postgres is not None and not self._postgres.running and not self._postgres_stopped:
            return "PostgreSQL"
        return None

    # --- fault controls: the tests break one part as production would, then watch it recover ---

    async def kill_sidecar(self) -> int:
        """SIGKILL the sidecar, as the OOM killer or a crash would (no graceful stop: nothing it
        holds in memory is saved); returns its pid once it is gone. The supervisor restarts it
        after the restart policy's wait."""
        child = self._children.get(SIDECAR)
        if child is None or child.poll() is not None:
            raise StackError("no sidecar is running to kill")
        child.kill()
        await asyncio.to_thread(child.wait)
        return child.pid

    async def wait_sidecar_restarted(self, restarts: int = 1, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Return once the sidecar has been restarted ``restarts`` times in all (counted since
        the Stack started) and the running one is ready; StackError after ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s), self._sidecar_changed:
                await self._sidecar_changed.wait_for(
                    lambda: self._sidecar_restarts >= restarts and self._sidecar_ready
                )
        except TimeoutError:
            raise StackError(
                f"the sidecar was not restarted {restarts} time(s) and ready within {timeout_s:g} s "
                f"(restarts so far: {self._sidecar_restarts}, ready: {self._sidecar_ready}); "
                f"see {_run_dir(self.settings)}/sidecar.log"
            ) from None

    async def restart_envoy(self, *, hard: bool) -> None:
        """Stop Envoy and start a new one with the same rendered configuration, ports and admin
        socket; returns once the new one is ready.

        ``hard``: SIGKILL, as a crash would — requests in flight are cut and the gRPC access-log
        entries Envoy buffered are lost (its file log has them). Otherwise the graceful stop of
        ``up``'s Ctrl-C: buffered entries are sent first, then SIGTERM."""
        envoy = self._envoy
        if envoy is None:
            raise StackError("Envoy is not running: start the stack first")
        self._envoy_restarting = True
        try:
            if hard:
                await envoy.kill()
            else:
                await envoy.stop()
            await envoy.start()
        finally:
            self._envoy_restarting = False

    async def stop_postgres(self) -> None:
        """Stop the Stack's own PostgreSQL (a fast shutdown: sessions are cut, committed data
        stays); the sidecar's connections fail until :meth:`start_postgres`."""
        postgres = self._own_postgres()
        self._postgres_stopped = True
        await asyncio.to_thread(postgres.stop)

    async def start_postgres(self) -> None:
        """Start the Stack's own PostgreSQL again on the same data and port: the URL the sidecar
        holds is right again, and it reconnects by itself."""
        postgres = self._own_postgres()
        url = await asyncio.to_thread(postgres.start)
        self._postgres_stopped = False
        if url != self.database_url:
            raise StackError("PostgreSQL came back at another address; the sidecar cannot find it")

    def _own_postgres(self) -> EmbeddedPostgres:
        if self._postgres is None:
            raise StackError(
                "this Stack does not run its own PostgreSQL (DATABASE_URL is set, or it is not started)"
            )
        return self._postgres

    async def stop(self) -> None:
        await self._stop_supervising()
        if self._envoy is not None:
            await self._envoy.stop()
            self._envoy = None
        for child in reversed(self._children.values()):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in reversed(self._children.values()):
            try:
                await asyncio.to_thread(child.wait, 10)
            except subprocess.TimeoutExpired:
                child.kill()
                await asyncio.to_thread(child.wait)
        self._children.clear()
        if self.mail_sink is not None:
            await self.mail_sink.stop()
            self.mail_sink = None
        if self._postgres is not None:
            await asyncio.to_thread(self._postgres.stop)
            (_run_dir(self.settings) / "database_url").unlink(missing_ok=True)
            self._postgres = None


def _greeting(stack: Stack) -> str:
    url = stack.gateway_url
    return f"""
BillingProxy is up: {url}

Try it:
  curl -s {url}/user/signup -H 'content-type: application/json' -d '{{"email": "you@example.com"}}'
  export KEY=sk-litellm-…   # the api_key from the answer
  curl -s {url}/v1/chat/completions -H "authorization: Bearer $KEY" \\
       -H 'content-type: application/json' \\
       -d '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "Hello"}}]}}'
  curl -s {url}/billing/balance -H "authorization: Bearer $KEY"

Your account page (balance, spend, keys, top-up): open {url}/account and sign in with $KEY.

{_stripe_greeting(stack)}{_mail_greeting(stack)}
Logs: {_run_dir(stack.settings)}/   Stop: Ctrl-C
"""


def _mail_greeting(stack: Stack) -> str:
    if stack.mail_sink is None:
        return ""
    assert stack.mail_sink.directory is not None
    return f"""Alert mail (low balance, recharges, key limits) goes to a local mail sink: each mail
  is printed here as it arrives and saved in {stack.mail_sink.directory}/.
  Set BILLINGPROXY_SMTP_URL to send real mail instead.
"""


def _stripe_greeting(stack: Stack) -> str:
    url = stack.gateway_url
    topup = f"""Top up (when the wallet is empty, requests get 403 with this link):
  curl -s {url}/billing/topup -H "authorization: Bearer $KEY" \\
       -H 'content-type: application/json' -d '{{"amount_usd": "10.00"}}'
  … then open the checkout_url it answers — or open {url}/account/top-up in a browser.
"""
    listen = f"stripe listen --forward-to {url}/stripe/webhook"
    if stack.stripe_double_url:
        return (
            topup
            + f"""Payments: local Stripe TEST MODE double at {stack.stripe_double_url} \
(no account, no real money):
  its checkout page has a "Pay (test)" button that sends a signed webhook to the gateway.
  To use your own Stripe test account instead, set STRIPE_SECRET_KEY=sk_test_… and forward
  webhooks with `{listen}`, setting STRIPE_WEBHOOK_SECRET to the whsec_… it prints.
"""
        )
    return (
        topup
        + f"""Payments: Stripe ({stack.settings.stripe_api_base or "api.stripe.com"}). \
Forward test webhooks to this gateway with:
  {listen}
  (STRIPE_WEBHOOK_SECRET must be the whsec_… that `stripe listen` prints.)
"""
    )


async def _serve(stack: Stack) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP: the terminal closed. The children are in sessions of their own, so `up` is the
    # one that hears it and stops them in order.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    await stack.start()
    print(_greeting(stack), flush=True)
    status = 0
    try:
        while not stop.is_set():
            dead = stack.dead_child()
            if dead is not None:
                print(
                    f"billingproxy: the {dead} stopped unexpectedly; see {_run_dir(stack.settings)}/",
                    file=sys.stderr,
                )
                status = 1
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
    finally:
        print("stopping…", flush=True)
        await stack.stop()
    return status


def main(settings: settings_mod.Settings) -> int:
    """Run until Ctrl-C. ``settings`` was already checked; the children read the same environment."""
    del settings  # the Stack re-reads the environment it hands to its children
    try:
        return asyncio.run(_serve(Stack(os.environ, say=lambda m: print(m, flush=True), mail_sink=True)))
    except (StackError, envoy_process.EnvoyError, PostgresStartError) as exc:
        print(f"billingproxy: {exc}", file=sys.stderr)
        return 2
