"""What the operator tests drive: a Kubernetes API client, the operator in a thread, polling.

The operator runs as it does in production (``runner.run``, kopf's own event loop), in a
thread: kopf cancels every task of its loop when it stops and installs signal handlers on the
main thread, neither of which may touch pytest's loop, where the kmock server lives.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import sqlalchemy as sa
from support import waiting

from billing import audit, tables
from billing_operator import runner, settings as operator_settings
from billingproxy.devstack import local_stack

T = TypeVar("T")
GROUP_VERSION = "billingproxy.io/v1alpha1"
POLL_TIMEOUT_S = 30.0  # generous for a loaded CI machine; a healthy run takes well under a second
POLL_INTERVAL_S = 0.05
# The RBAC verb of each kind of call kmock records (what a Role must grant for it).
RBAC_VERBS = {
    "LIST": "list",
    "WATCH": "watch",
    "FETCH": "get",
    "CREATE": "create",
    "UPDATE": "patch",
    "DELETE": "delete",
}


async def eventually(
    probe: Callable[[], Awaitable[T]], *, timeout_s: float = POLL_TIMEOUT_S, what: str = "the condition"
) -> T:
    """Poll ``probe`` until it returns a truthy value (returned) or fails the test."""
    return await waiting.wait_until(probe, timeout_s, what, interval=POLL_INTERVAL_S)


def server_ports(count: int) -> list[int]:
    """``count`` distinct ports, free now, below the kernel's ephemeral range, for servers a test
    starts (Envoy, the sidecar): see ``billingproxy.devstack.local_stack.free_port`` for why."""
    return [local_stack.free_port() for _ in range(count)]


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class Kube:
    """A small Kubernetes API client over HTTP, for the tests' side of the conversation."""

    def __init__(self, session: aiohttp.ClientSession, namespace: str = "default") -> None:
        self.session = session
        self.namespace = namespace

    def _path(self, plural: str, name: str | None = None, *, subresource: str | None = None) -> str:
        base = "/api/v1" if plural in ("secrets", "events") else f"/apis/{GROUP_VERSION}"
        path = f"{base}/namespaces/{self.namespace}/{plural}"
        if name is not None:
            path += f"/{name}"
        if subresource is not None:
            path += f"/{subresource}"
        return path

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self.session.request(method, path, **kwargs) as response:
            body = await response.json(content_type=None)
            if response.status >= 400:
                raise ApiError(response.status, body)
            return body

    async def create(self, kind: str, name: str, spec: dict[str, Any], **metadata: Any) -> dict[str, Any]:
        plural = {"Wallet": "wallets", "ApiKey": "apikeys"}[kind]
        body = {
            "apiVersion": GROUP_VERSION,
            "kind": kind,
            "metadata": {"name": name, "namespace": self.namespace, **metadata},
            "spec": spec,
        }
        return await self._call("POST", self._path(plural), json=body)

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        plural = {"Wallet": "wallets", "ApiKey": "apikeys"}[manifest["kind"]]
        body = {**manifest, "metadata": {**manifest["metadata"], "namespace": self.namespace}}
        return await self._call("POST", self._path(plural), json=body)

    async def get(self, plural: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("GET", self._path(plural, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def patch_spec(self, plural: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return await self._call(
            "PATCH",
            self._path(plural, name),
            json={"spec": spec},
            headers={"Content-Type": "application/merge-patch+json"},
        )

    async def delete(self, plural: str, name: str) -> None:
        await self._call("DELETE", self._path(plural, name))

    async def create_secret(self, name: str, data: dict[str, str]) -> dict[str, Any]:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": name},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }
        return await self._call("POST", self._path("secrets"), json=body)

    async def events(self) -> list[dict[str, Any]]:
        return (await self._call("GET", self._path("events")))["items"]

    async def events_for(self, name: str, reason: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in await self.events()
            if e.get("involvedObject", {}).get("name") == name
            and (reason is None or e.get("reason") == reason)
        ]

    # -- polling helpers -------------------------------------------------------------------------

    async def wait_for(
        self,
        plural: str,
        name: str,
        check: Callable[[dict[str, Any]], bool],
        *,
        timeout_s: float = POLL_TIMEOUT_S,
        what: str | None = None,
    ) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            obj = await self.get(plural, name)
            return obj if obj is not None and check(obj) else None

        return await eventually(
            probe, timeout_s=timeout_s, what=what or f"{plural}/{name} reaching the state"
        )

    async def wait_gone(self, plural: str, name: str, *, timeout_s: float = POLL_TIMEOUT_S) -> None:
        async def probe() -> bool:
            return await self.get(plural, name) is None

        await eventually(probe, timeout_s=timeout_s, what=f"{plural}/{name} being deleted")

    async def wait_event(
        self, name: str, reason: str, *, timeout_s: float = POLL_TIMEOUT_S
    ) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            found = await self.events_for(name, reason)
            return found[-1] if found else None

        return await eventually(probe, timeout_s=timeout_s, what=f"an Event {reason} for {name}")


def condition(obj: dict[str, Any], type_: str = "Ready") -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def is_ready(obj: dict[str, Any]) -> bool:
    cond = condition(obj)
    return (
        cond is not None
        and cond["status"] == "True"
        and (obj.get("status") or {}).get("observedGeneration") == obj["metadata"].get("generation")
    )


def reason_is(reason: str, status: str = "False", type_: str = "Ready") -> Callable[[dict[str, Any]], bool]:
    def check(obj: dict[str, Any]) -> bool:
        cond = condition(obj, type_)
        return cond is not None and cond["reason"] == reason and cond["status"] == status

    return check


def secret_value(secret: dict[str, Any], key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()


class TcpProxy:
    """A TCP relay to PostgreSQL that the test can cut and restore: "the database is away".

    ``close()`` refuses new connections and drops the open ones, like a database that went down;
    ``open()`` listens again on the same port.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._generation = 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        self._generation += 1
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        generation = self._generation
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        if generation != self._generation:  # cut while connecting
            up_writer.transport.abort()
            writer.transport.abort()
            return
        self._writers.add(up_writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    def url(self, database_url: str) -> str:
        parts = urlsplit(database_url)
        userinfo = parts.netloc.rpartition("@")[0]
        return parts._replace(
            netloc=f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        ).geturl()


class _ThreadLog(logging.Handler):
    """kopf's log records from one thread: what that operator said (INFO and up, and the
    watch-streams starting, which kopf logs at DEBUG)."""

    def __init__(self, thread: threading.Thread) -> None:
        super().__init__(logging.DEBUG)
        self.thread = thread
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread.ident:
            self.records.append(record)


class OperatorThread:
    """``runner.run`` in a thread of its own with its own loop.

    start() returns once kopf watches both kinds, not merely once its startup handlers ran: an
    operator stopped while kopf was still discovering the API (a test whose awaited state was
    already true) left discovery requests waiting for credentials kopf had just dropped, and
    every such stop took kopf's 5 s grace for hung tasks.

    stop() fails the test if kopf had to leave a timer running (``did not exit in time``): an
    orphaned timer outlives the cleanup that closes the database pool and kopf's API session,
    and whatever it opens then is never closed (it surfaced as ResourceWarnings in later tests).
    """

    WATCHED = ("wallets.v1alpha1.billingproxy.io", "apikeys.v1alpha1.billingproxy.io")

    def __init__(self, cfg: operator_settings.OperatorSettings) -> None:
        self.cfg = cfg
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="operator", daemon=True)
        self._log = _ThreadLog(self._thread)
        self._kopf_logger = logging.getLogger("kopf")
        self._kopf_level = self._kopf_logger.level
        self._watching_logger = logging.getLogger("kopf._cogs.clients.watching")
        self._watching_level = self._watching_logger.level

    def _main(self) -> None:
        try:
            asyncio.run(runner.run(self.cfg, stop_flag=self._stop, ready_flag=self._ready))
        except BaseException as exc:  # noqa: BLE001 (any end of the operator thread is reported by stop())
            self._error = exc

    def logged(self, text: str) -> bool:
        return any(text in record.getMessage() for record in self._log.records)

    async def start(self) -> None:
        self._kopf_logger.addHandler(self._log)
        if not self._kopf_logger.isEnabledFor(logging.INFO):
            self._kopf_logger.setLevel(logging.INFO)
        self._watching_logger.setLevel(logging.DEBUG)
        self._thread.start()
        started = await asyncio.to_thread(self._ready.wait, 30)

        async def watching() -> bool:
            return self._error is not None or all(
                self.logged(f"Starting the watch-stream for {resource}") for resource in self.WATCHED
            )

        try:
            if not started:
                raise AssertionError("the operator did not start within 30 s")
            await eventually(watching, what="kopf watching Wallets and ApiKeys")
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 30)
        assert not self._thread.is_alive(), "the operator did not stop within 30 s"
        self._kopf_logger.removeHandler(self._log)
        self._kopf_logger.setLevel(self._kopf_level)
        self._watching_logger.setLevel(self._watching_level)
        if self._error is not None:
            raise self._error
        orphaned = [r.getMessage() for r in self._log.records if "did not exit in time" in r.getMessage()]
        assert not orphaned, f"kopf left timers running after the operator stopped: {orphaned}"


@contextlib.asynccontextmanager
async def running(cfg: operator_settings.OperatorSettings):
    operator = OperatorThread(cfg)
    await operator.start()
    try:
        yield operator
    finally:
        await operator.stop()


# -- PostgreSQL, as the tests read it ---------------------------------------------------------------


async def wallet_rows(engine: Any, external_id: str) -> list[Any]:
    async with engine.connect() as conn:
        w = tables.wallets
        return (await conn.execute(sa.select(w).where(w.c.external_id == external_id))).all()


async def ledger_rows(engine: Any, wallet_id: str) -> list[Any]:
    async with engine.connect() as conn:
        le = tables.ledger_entries
        return (await conn.execute(sa.select(le).where(le.c.wallet_id == wallet_id).order_by(le.c.id))).all()


async def key_rows(engine: Any, *, external_id: str | None = None, wallet_id: str | None = None) -> list[Any]:
    k = tables.api_keys
    query = sa.select(k).order_by(k.c.created_at, k.c.id)
    if external_id is not None:
        query = query.where(k.c.external_id == external_id)
    if wallet_id is not None:
        query = query.where(k.c.wallet_id == wallet_id)
    async with engine.connect() as conn:
        return (await conn.execute(query)).all()


async def books_balance(engine: Any) -> None:
    problems = (await audit.run(engine)).findings
    assert not problems, problems
