"""`billingproxy up` as a person runs it: a real process tree on embedded PostgreSQL, the first
command it prints works, Ctrl-C stops every child, a second `up` keeps the data, a killed sidecar
is restarted by `up` itself, and a port that is taken is refused up front with the setting to
change."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from support import processes, waiting

from billingproxy.devstack.local_stack import free_ports_env

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0


def _env(data_dir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BILLINGPROXY_", "STRIPE_")) and k != "DATABASE_URL"
    }
    env["BILLINGPROXY_DATA_DIR"] = str(data_dir)
    env.update(free_ports_env())
    return env


class Up:
    """One `python -m billingproxy up` child, its output collected line by line."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.lines: list[str] = []
        self.process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.env['BILLINGPROXY_GATEWAY_PORT']}"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "billingproxy",
            "up",
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            # A process group of its own, as a shell gives a command run in a terminal.
            start_new_session=True,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    async def wait_for_line(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.lines:
                if text in line:
                    return line
            assert self.process is not None
            if self.process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"`up` never printed {text!r}; output:\n" + "\n".join(self.lines))

    async def interrupt(self) -> int:
        """Ctrl-C in the terminal: SIGINT to `up`'s whole process group, as the terminal sends it."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGINT)
        code = await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
        assert self._reader is not None
        await self._reader
        return code

    async def kill(self) -> None:
        """Clean-up after a failed test: Ctrl-C first, so `up` stops its children (SIGKILL would
        leave PostgreSQL, the sidecar and the rest running); SIGKILL only if that hangs."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            await self._reader


def _postmaster_pid(data_dir: Path) -> int:
    """The embedded PostgreSQL's pid: pg_ctl detaches it, so it is no descendant of `up`. As
    root the cluster may live elsewhere, named by the pointer file
    (billingproxy/devstack/postgres_server.py)."""
    cluster = data_dir / "postgres"
    pointer = cluster / "pgdata-location"
    if pointer.is_file():
        cluster = Path(pointer.read_text().strip())
    return int((cluster / "postmaster.pid").read_text().splitlines()[0])


async def _signup_and_chat(gateway: str, email: str) -> str:
    """The README's first two steps through ``gateway``: sign up, one chat completion (200).
    Returns the API key."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway}/user/signup", json={"email": email}) as r:
            assert r.status == 201, await r.text()
            key: str = (await r.json())["api_key"]
        headers = {"authorization": f"Bearer {key}"}
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}
        async with http.post(f"{gateway}/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
    return key


async def test_up_serves_stops_cleanly_and_keeps_its_data(tmp_path: Path) -> None:
    env = _env(tmp_path / "data")
    up = Up(env)
    await up.start()
    try:
        await up.wait_for_line("BillingProxy is up", START_TIMEOUT_S)
        assert any("stripe listen --forward-to" in line for line in up.lines)
        assert up.process is not None
        children = processes.descendants(up.process.pid)
        assert len(children) >= 4, f"expected sidecar, Envoy, demo backend, Stripe double: {children}"
        postmaster = _postmaster_pid(tmp_path / "data")
        assert processes.alive(postmaster) and postmaster not in children
        children.add(postmaster)

        key = await _signup_and_chat(up.gateway, "up@example.com")

        assert await up.interrupt() == 0
        assert any("stopping" in line for line in up.lines)
        # The terminal's SIGINT reached `up` alone; `up` stopped Envoy itself (SIGTERM, after its
        # access logs were flushed), not the terminal all children at once.
        envoy_log = (tmp_path / "data" / "run" / "envoy.log").read_text()
        assert "caught ENVOY_SIGTERM" in envoy_log and "SIGINT" not in envoy_log, envoy_log[-2000:]
        # Every child is gone — including PostgreSQL, which pg_ctl detached from the tree.
        left = {pid for pid in children if processes.alive(pid)}
        assert not left, f"processes outlived `up`: {left}"
        assert not (tmp_path / "data" / "run" / "database_url").exists()
    finally:
        await up.kill()

    again = Up(env)
    await again.start()
    try:
        await again.wait_for_line("BillingProxy is up", START_TIMEOUT_S)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{again.gateway}/billing/balance", headers={"authorization": f"Bearer {key}"}) as r,
        ):
            assert r.status == 200, await r.text()
            balance = await r.json()
        # The first run's signup and charge survived: the grant minus one request. (Interrupted
        # right after the request: Envoy's batched access-log entry must still be sent and settled.)
        assert balance["balance_usd"] != "0.500000" and balance["balance_usd"].startswith("0.49")
        assert await again.interrupt() == 0
    finally:
        await again.kill()


async def test_up_restarts_a_killed_sidecar_by_itself(tmp_path: Path) -> None:
    """SIGKILL the sidecar as the OOM killer would: `up` says so, starts it again after its
    back-off, and serves; Ctrl-C then stops the new sidecar with everything else."""
    up = Up(_env(tmp_path / "data"))
    await up.start()
    try:
        await up.wait_for_line("BillingProxy is up", START_TIMEOUT_S)
        assert up.process is not None
        (sidecar,) = processes.sidecars_under(up.process.pid)
        os.kill(sidecar, signal.SIGKILL)

        await up.wait_for_line(
            "the sidecar exited with status -9; restarting in 0.5 s (restart 1)", START_TIMEOUT_S
        )
        await up.wait_for_line("the sidecar is back and ready (restart 1)", START_TIMEOUT_S)
        (restarted,) = processes.sidecars_under(up.process.pid)
        assert restarted != sidecar
        await _signup_and_chat(up.gateway, "restarted@example.com")

        children = processes.descendants(up.process.pid)
        assert await up.interrupt() == 0
        assert not any("stopped unexpectedly" in line for line in up.lines), up.lines
        left = {pid for pid in children if processes.alive(pid)}
        assert not left, f"processes outlived `up`: {left}"
    finally:
        await up.kill()


async def test_a_taken_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    env = _env(tmp_path / "data")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env["BILLINGPROXY_GRPC_PORT"])))
        taken.listen()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "billingproxy",
            "up",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        out, err = await asyncio.wait_for(process.communicate(), START_TIMEOUT_S)
    message = err.decode()
    assert process.returncode == 2
    assert f"port {env['BILLINGPROXY_GRPC_PORT']}" in message and "BILLINGPROXY_GRPC_PORT" in message
    assert "Traceback" not in message + out.decode()
    assert not (tmp_path / "data" / "postgres").exists(), "nothing may start when a port is taken"


async def test_a_bad_setting_is_one_clear_line(tmp_path: Path) -> None:
    env = _env(tmp_path / "data") | {"BILLINGPROXY_FREE_GRANT_USD": "lots"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "billingproxy",
        "up",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, err = await asyncio.wait_for(process.communicate(), START_TIMEOUT_S)
    lines = err.decode().strip().splitlines()
    assert process.returncode == 2
    assert len(lines) == 1 and "BILLINGPROXY_FREE_GRANT_USD" in lines[0], lines
    assert json.dumps(out.decode())  # nothing else to say; stdout may be empty


async def test_up_shows_the_alert_mail_it_sends(tmp_path: Path) -> None:
    """No SMTP server configured: `up` runs a local mail sink, says so, and prints each mail."""
    env = _env(tmp_path / "data")
    # Just above the $1 default alert threshold of a wallet never topped up: one chat crosses it.
    env["BILLINGPROXY_FREE_GRANT_USD"] = "1.000001"
    env["BILLINGPROXY_ALERT_INTERVAL_MS"] = "100"
    up = Up(env)
    await up.start()
    try:
        await up.wait_for_line("BillingProxy is up", START_TIMEOUT_S)
        mail_dir = (tmp_path / "data" / "mail").absolute()
        assert any(f"saved in {mail_dir}/" in line for line in up.lines), up.lines

        async with aiohttp.ClientSession() as http:
            async with http.post(f"{up.gateway}/user/signup", json={"email": "mailed@example.com"}) as r:
                assert r.status == 201, await r.text()
                owner = await r.json()
            # The wallet is watched from the alert worker's next round, at its balance then.
            database_url = (tmp_path / "data" / "run" / "database_url").read_text().strip()
            db = await asyncpg.connect(database_url)
            try:

                async def watched() -> bool:
                    query = "SELECT count(*) FROM alert_endpoints WHERE wallet_id = $1"
                    return bool(await db.fetchval(query, owner["wallet_id"]))

                await waiting.wait_until(watched, START_TIMEOUT_S, "the wallet to be watched for its mail")
            finally:
                await db.close()
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}
            headers = {"authorization": f"Bearer {owner['api_key']}"}
            async with http.post(f"{up.gateway}/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status == 200, await r.text()

        await up.wait_for_line(
            "mail to mailed@example.com: [BillingProxy] Your balance is low", START_TIMEOUT_S
        )
        [saved] = sorted(mail_dir.glob("*.eml"))
        assert b"mailed@example.com" in saved.read_bytes()
        assert await up.interrupt() == 0
    finally:
        await up.kill()
