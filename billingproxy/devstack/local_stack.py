"""`billingproxy up`: the whole gateway on one machine, from embedded defaults.

Starts, in order, each waiting until the previous one is ready: PostgreSQL (embedded, data kept
in ``<data_dir>/postgres``, unless DATABASE_URL is set) → migrations → the demo LLM backend
(unless BILLINGPROXY_BACKEND_URL names a real one) → the local Stripe test double (unless
STRIPE_SECRET_KEY is set; see docs/stripe.md) → the sidecar → Envoy. The children share one
environment, so the sidecar and the Envoy config read the same settings. Ctrl-C (or any child
dying) stops everything in reverse order.

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
from billingproxy.devstack.postgres_server import EmbeddedPostgres, PostgresStartError

READY_TIMEOUT_S = 30.0


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


class Stack:
    """The processes of one gateway. ``env`` holds the settings (BILLINGPROXY_*, DATABASE_URL)."""

    def __init__(
        self, env: Mapping[str, str], *, say: Callable[[str], object] = print, durable: bool = True
    ) -> None:
        self.env = dict(env)
        # A new secret for each run: Envoy's rendered config and the sidecar's environment get it.
        self.env[f"{settings_mod.ENV_PREFIX}ACCESS_LOG_SECRET"] = secrets.token_urlsafe(32)
        self.settings = settings_mod.from_env(self.env)
        self._say = say
        self._durable = durable
        self._postgres: EmbeddedPostgres | None = None
        self._children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._envoy: envoy_process.EnvoyProcess | None = None
        self.database_url = ""
        self.backend_url = ""
        # Set when no Stripe key is configured and the local test double was started instead.
        self.stripe_double_url = ""

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.gateway_port}"

    @property
    def envoy(self) -> envoy_process.EnvoyProcess | None:
        """The running Envoy (its admin socket, config and log), once started."""
        return self._envoy

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
        logs = _run_dir(s)
        logs.mkdir(parents=True, exist_ok=True)

        if s.database_url:
            self.database_url = s.database_url
            self._say("using the database at DATABASE_URL")
        else:
            self._say(f"starting PostgreSQL (data in {s.data_dir / 'postgres'})…")
            self._postgres = EmbeddedPostgres(s.data_dir / "postgres", durable=self._durable)
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

        self._say(
            f"starting the sidecar (Check :{s.check_port}, gRPC :{s.grpc_port}, API :{s.api_port}, admin "
            f":{s.admin_port})…"
        )
        self._spawn("sidecar", [sys.executable, "-m", "billingproxy", "sidecar"], logs / "sidecar.log")
        await self._wait_http("sidecar", f"http://127.0.0.1:{s.admin_port}/readyz")

        self._say(f"starting Envoy on {s.bind_host}:{s.gateway_port}…")
        config = envoy_config.render_yaml(s, backend_url=self.backend_url)
        s.access_log_path.parent.mkdir(parents=True, exist_ok=True)  # Envoy creates the file, not its folder
        # A dynamic base id lets several stacks (tests, benchmarks) run side by side.
        self._envoy = envoy_process.EnvoyProcess(
            config,
            base_id=None,
            log_path=logs / "envoy.log",
            file_flush_interval_ms=envoy_config.FILE_FLUSH_INTERVAL_MS,
        )
        await self._envoy.start()
        self._say(f"Envoy ready at {self.gateway_url}")

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
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        self._children.append((name, child))

    async def _wait_http(self, name: str, url: str, headers: Mapping[str, str] | None = None) -> None:
        child = dict(self._children).get(name)
        deadline = time.monotonic() + READY_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
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
        raise StackError(f"the {name} was not ready at {url} within {READY_TIMEOUT_S:.0f} s")

    def process_ids(self) -> dict[str, int]:
        """The running processes by part ("sidecar", "demo backend", "stripe double", "envoy",
        "postgres"), for tools that measure them (``make bench``)."""
        pids = {name: child.pid for name, child in self._children if child.poll() is None}
        if self._envoy is not None and self._envoy.pid is not None:
            pids["envoy"] = self._envoy.pid
        if self._postgres is not None and self._postgres.postmaster_pid is not None:
            pids["postgres"] = self._postgres.postmaster_pid
        return pids

    @property
    def embedded_postgres(self) -> EmbeddedPostgres | None:
        return self._postgres

    def dead_child(self) -> str | None:
        """The name of a child that exited on its own, if any."""
        for name, child in self._children:
            if child.poll() is not None:
                return name
        if self._envoy is not None and not self._envoy.running:
            return "Envoy"
        return None

    async def stop(self) -> None:
        if self._envoy is not None:
            await self._envoy.stop()
            self._envoy = None
        for _name, child in reversed(self._children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for _name, child in reversed(self._children):
            try:
                await asyncio.to_thread(child.wait, 10)
            except subprocess.TimeoutExpired:
                child.kill()
                await asyncio.to_thread(child.wait)
        self._children.clear()
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

{_stripe_greeting(stack)}
Logs: {_run_dir(stack.settings)}/   Stop: Ctrl-C
"""


def _stripe_greeting(stack: Stack) -> str:
    url = stack.gateway_url
    topup = f"""Top up (when the wallet is empty, requests get 403 with this link):
  curl -s {url}/billing/topup -H "authorization: Bearer $KEY" \\
       -H 'content-type: application/json' -d '{{"amount_usd": "10.00"}}'
  … then open the checkout_url it answers — or open {url}/billing/topup in a browser.
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
    for sig in (signal.SIGINT, signal.SIGTERM):
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
        return asyncio.run(_serve(Stack(os.environ, say=lambda m: print(m, flush=True))))
    except (StackError, envoy_process.EnvoyError, PostgresStartError) as exc:
        print(f"billingproxy: {exc}", file=sys.stderr)
        return 2
