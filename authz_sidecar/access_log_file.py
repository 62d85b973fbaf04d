"""Envoy's JSON access-log file: the durable record that settles whatever the gRPC log did not.

Why: Envoy's gRPC access log is lossy by design. While the sidecar is away (killed, restarting,
its database down for longer than a settlement's retries) Envoy drops the entries it cannot send
and counts them as written. Envoy also appends every request to a JSON access-log file
(``Settings.access_log_path``, ``envoy_config._file_access_log``): the data dir locally, a volume
the gateway pod's two containers share in Kubernetes. :class:`Follower` reads that file a round
at a time and settles each request whose hold is still unresolved, through the same
:class:`~authz_sidecar.access_log.Settler` (the same facts, prices and statement) — so a request
the gRPC log settled is never charged twice, and one it lost is charged exactly as it would have
been (docs/decisions/0029-settle-from-the-access-log-file.md).

How far it got is kept in PostgreSQL (``access_log_cursors``), per file, so a restarted or new
sidecar carries on where the last stopped. A file is known by the SHA-256 of its first line: that
line names a request id Envoy minted and its start time, so no two files share it, whatever
their path or inode. The offset only ever moves past lines whose settlement committed; a round
that fails (the database is down) is retried from the same offset, and settling is idempotent
on the request id, so a line read twice changes nothing.

Rotation and retention (nothing fills the disk): once the follower has settled
``access_log_rotate_bytes`` of the live file, it renames it ``access.log.1`` (replacing the
previous one, long settled) and asks Envoy to reopen its log (admin ``POST /reopen_logs``). It
goes on reading the renamed file, which Envoy keeps appending to until it has reopened; when a new
``access.log`` appears, nothing more goes to the old one, which is read to its end before moving
on. At most two files exist: the live one and one rotated file, kept for ``billingproxy
reconcile`` by hand. A file renamed by someone else (logrotate) is followed the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import aiohttp

from authz_sidecar import metrics
from authz_sidecar.access_log import FinishedRequest, Settler, finished_request_from_json
from billing import database

logger = logging.getLogger(__name__)

FOLLOW_INTERVAL_S = 0.5
# A round reads at most this much; a file far behind is caught up over several rounds.
ROUND_BYTES_MAX = 4 * 1024 * 1024
# Envoy's lines are a few hundred bytes; a line longer than this is not one of them (skipped).
LINE_BYTES_MAX = 1024 * 1024
ROTATED_SUFFIX = ".1"
# How often to ask Envoy again to reopen its log while it still writes to a renamed file.
REOPEN_RETRY_S = 5.0
ADMIN_TIMEOUT_S = 2.0

_HOLD_STATES = "SELECT request_id, state FROM holds WHERE request_id = ANY($1::text[])"
_UNRESOLVED_STATES = ("pending", "expired")
_LOAD_CURSOR = "SELECT position FROM access_log_cursors WHERE log_id = $1::text"
_SAVE_CURSOR = """
INSERT INTO access_log_cursors (log_id, path, position) VALUES ($1::text, $2::text, $3::bigint)
ON CONFLICT (log_id) DO UPDATE
   SET position = greatest(access_log_cursors.position, excluded.position),
       path = excluded.path, updated_at = now()
"""


def read_lines(lines: Iterable[str]) -> tuple[list[FinishedRequest], Counter[str]]:
    """The settleable requests in access-log ``lines`` (the last line wins for a request id) and
    what was skipped, by reason. Envoy's own log lines may share a file; they are skipped."""
    found: dict[str, FinishedRequest] = {}
    skipped: Counter[str] = Counter()
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if not line.startswith("{"):
            skipped["not an access-log line"] += 1
            continue
        try:
            record = json.loads(line)
        except ValueError:
            skipped["not an access-log line"] += 1
            continue
        done = finished_request_from_json(record) if isinstance(record, dict) else None
        if done is None:
            skipped["nothing to settle (no hold)"] += 1
            continue
        found[done.request_id] = done
    return list(found.values()), skipped


@dataclasses.dataclass
class _Followed:
    """One open access-log file and how far it is settled."""

    path: Path  # where it is now (the live path, or the rotated one once renamed)
    handle: BinaryIO
    inode: int
    log_id: str | None = None  # known once its first line is complete
    position: int = 0

    def size(self) -> int:
        return os.fstat(self.handle.fileno()).st_size


class Follower:
    """Settles from Envoy's access-log file what the gRPC log did not (see the module docstring).

    ``run()`` follows until cancelled; ``follow_once()`` is one round (tests, and the sidecar's
    last round when it stops). ``admin_socket``: Envoy's admin, asked to reopen its log after a
    rotation.
    """

    def __init__(
        self, settler: Settler, db: database.Database, path: Path, *, rotate_bytes: int, admin_socket: Path
    ) -> None:
        self._settler = settler
        self._db = db
        self._path = path
        self._rotated = path.with_name(path.name + ROTATED_SUFFIX)
        self._rotate_bytes = rotate_bytes
        self._admin_socket = admin_socket
        self._current: _Followed | None = None
        self._reopen_asked_at = -REOPEN_RETRY_S
        self._failing = False

    async def run(self) -> None:
        while True:
            try:
                await self.follow_once()
                if self._failing:
                    logger.info("settling from the access-log file works again")
                self._failing = False
            except Exception as exc:  # noqa: BLE001 (the next round retries from the same offset)
                if not self._failing:
                    logger.warning("settling from the access-log file %s failed: %r", self._path, exc)
                self._failing = True
            await asyncio.sleep(FOLLOW_INTERVAL_S)

    async def follow_once(self) -> int:
        """Settle every complete line written so far (up to :data:`ROUND_BYTES_MAX` a file),
        follow a rotation, rotate when due. Returns how many requests it settled.

        A round that raises (the database or the file unreachable) counts in
        ``billingproxy_access_log_file_failures_total``; the next retries from the same offset.
        The lag gauge is set before the round touches the database and again when it ends,
        however it ends: while the database is down it shows the file growing unsettled."""
        self._measure_lag()
        try:
            return await self._follow_once()
        except Exception:
            metrics.access_log_file_failures.inc()
            raise
        finally:
            self._measure_lag()

    def _measure_lag(self) -> None:
        """``billingproxy_access_log_file_lag_bytes`` from what the follower knows without the
        database: the open file's size (fstat) past its settled offset, or — before a file could
        be opened and its saved offset read — the whole live file, none of it known settled."""
        if self._current is not None:
            lag = self._current.size() - self._current.position
        else:
            try:
                lag = self._path.stat().st_size
            except FileNotFoundError:
                lag = 0
        metrics.access_log_file_lag_bytes.set(max(0, lag))

    async def _follow_once(self) -> int:
        if self._current is None:
            self._current = await self._open_first()
            if self._current is None:
                return 0
        _, settled = await self._settle_new_lines(self._current)
        live = _inode(self._path)
        if live is None:
            # Renamed (by our rotation or by someone else) and Envoy still writes to it.
            await self._ask_envoy_to_reopen()
        elif live != self._current.inode:
            # Envoy opened a new file: nothing more goes to the old one. Finish it, then move on.
            while (consumed := await self._settle_new_lines(self._current))[0]:
                settled += consumed[1]
            self._close()
            self._current = await self._open(self._path)
            if self._current is not None:
                settled += (await self._settle_new_lines(self._current))[1]
        elif self._rotation_due(self._current):
            self._rotate(self._current)
            await self._ask_envoy_to_reopen(now=True)
        return settled

    def close(self) -> None:
        self._close()

    # --- files -----------------------------------------------------------------------------------

    async def _open_first(self) -> _Followed | None:
        """The file to start with: the rotated one while Envoy still writes to it (no live file
        yet) or while it has lines not settled; else the live one; None while neither exists."""
        rotated = await self._open(self._rotated)
        if rotated is not None:
            if _inode(self._path) is None or rotated.position < rotated.size():
                return rotated
            rotated.handle.close()
        return await self._open(self._path)

    async def _open(self, path: Path) -> _Followed | None:
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            return None
        followed = _Followed(path, handle, os.fstat(handle.fileno()).st_ino)
        try:
            await self._identify(followed)
        except BaseException:
            handle.close()  # the database is away: the next round opens it again
            raise
        return followed

    async def _identify(self, followed: _Followed) -> None:
        """Name the file by its first line, once complete, and resume from its saved offset."""
        if followed.log_id is not None:
            return
        followed.handle.seek(0)
        first = followed.handle.readline(LINE_BYTES_MAX)
        if not first.endswith(b"\n"):
            return  # empty, or its first line still being written
        followed.log_id = hashlib.sha256(first).hexdigest()
        async with database.acquire(self._db) as conn:
            saved = await conn.fetchval(_LOAD_CURSOR, followed.log_id)
        followed.position = saved or 0

    def _close(self) -> None:
        if self._current is not None:
            self._current.handle.close()
            self._current = None

    def _rotation_due(self, followed: _Followed) -> bool:
        return followed.position >= self._rotate_bytes and followed.position == followed.size()

    def _rotate(self, followed: _Followed) -> None:
        """Rename the live file, settled to its end, to ``access.log.1`` (replacing the last one,
        settled long ago); Envoy appends to it until it reopens its log."""
        os.replace(self._path, self._rotated)
        followed.path = self._rotated
        logger.info("rotated the access-log file at %d bytes to %s", followed.position, self._rotated)

    async def _ask_envoy_to_reopen(self, *, now: bool = False) -> None:
        """POST /reopen_logs; while Envoy still writes to a renamed file, at most every
        :data:`REOPEN_RETRY_S` (``now``: right after our own rotation, whenever the last was)."""
        asked_at = time.monotonic()
        if not now and asked_at - self._reopen_asked_at < REOPEN_RETRY_S:
            return
        self._reopen_asked_at = asked_at
        connector = aiohttp.UnixConnector(path=str(self._admin_socket))
        try:
            async with (
                aiohttp.ClientSession(
                    connector=connector, timeout=aiohttp.ClientTimeout(total=ADMIN_TIMEOUT_S)
                ) as session,
                session.post("http://envoy/reopen_logs") as response,
            ):
                if response.status != 200:
                    logger.warning("Envoy's /reopen_logs answered %d", response.status)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            logger.warning("could not ask Envoy to reopen its access log (%r); asking again later", exc)

    # --- lines -----------------------------------------------------------------------------------

    async def _settle_new_lines(self, followed: _Followed) -> tuple[int, int]:
        """Settle the complete lines after ``followed.position`` (one round's worth at most) and
        save the new offset; the bytes it consumed (0: none complete yet) and requests it settled."""
        await self._identify(followed)
        if followed.log_id is None:
            return 0, 0
        followed.handle.seek(followed.position)
        data = followed.handle.read(ROUND_BYTES_MAX)
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) < LINE_BYTES_MAX:
                return 0, 0  # a line still being written
            end = len(data) - 1  # no line of Envoy's is this long: skip it whole
        chunk = data[: end + 1]
        requests, _skipped = read_lines(chunk.decode("utf-8", errors="replace").splitlines())
        settled = await self._settle_unresolved(requests)
        followed.position += len(chunk)
        async with database.acquire(self._db) as conn:
            await conn.execute(_SAVE_CURSOR, followed.log_id, str(followed.path), followed.position)
        return len(chunk), settled

    async def _settle_unresolved(self, requests: list[FinishedRequest]) -> int:
        """Settle those of ``requests`` whose hold is still pending or expired (the gRPC log
        settled the rest already), and the refusals of Checks Envoy gave up on whose request id
        has no hold yet: their report leaves a void in its place, so a hold committed later is
        refused (``holds.void_before_hold``), as when the gRPC log delivers it. One query picks
        them."""
        if not requests:
            return 0
        async with database.acquire(self._db) as conn:
            states = {
                row["request_id"]: row["state"]
                for row in await conn.fetch(_HOLD_STATES, [done.request_id for done in requests])
            }
        todo = [
            done
            for done in requests
            if states.get(done.request_id) in _UNRESOLVED_STATES
            or (done.check_failed and done.request_id not in states)
        ]
        if todo:
            await self._settler.settle(todo)
            metrics.access_log_file_recovered.inc(len(todo))
            logger.info("settled %d requests from the access-log file", len(todo))
        return len(todo)


def _inode(path: Path) -> int | None:
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_ino
    return None
