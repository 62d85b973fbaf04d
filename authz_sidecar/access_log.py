"""Envoy's gRPC access log: each finished request's usage, priced and settled against its hold.

Envoy streams ``StreamAccessLogsMessage``s; each HTTP entry carries the ext_authz metadata (hold,
wallet, key, model, the answer's usage format) and the Lua filter's ``billingproxy.usage`` (the
raw JSON text of the provider's final usage object, and whether the answer finished), which
``billing.usage.read`` parses. Entries go through a bounded queue to a few workers, so a slow database applies
back-pressure to Envoy instead of growing memory; each worker settles what has arrived as one
batch, in one transaction. Settlement is idempotent on the request id, so
an entry delivered twice charges once.

Policy (docs/architecture.md): a 2xx whose answer finished with a valid usage object is charged
its exact price; any other 2xx (the client hung up before the terminal event, the backend cut
the stream or sent no usage, the usage object is invalid) is charged the hold — the worst-case
estimate — and says so in the entry's details; so is a request the backend received whose answer
Envoy cut (the client left before the first byte: status 0; Envoy's route or idle timeout: UT, SI),
whatever its status; any other status is voided (docs/decisions/0031-aborted-streams-pay-the-hold.md).

Trust (docs/decisions/0002-only-envoy-reports-usage.md): only Envoy reports usage. A stream is
read only if its gRPC initial metadata carries the access-log secret Envoy was configured with
(checked in constant time; refused UNAUTHENTICATED otherwise, nothing read from it), and an entry
is settled only if the wallet and model it names are those of the hold the Check recorded (the
settlement statement checks it; refused and counted otherwise, the hold left as it was).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from authz_sidecar import contract, metrics
from billing import database, hold_batches, holds, pricing, usage as usage_mod

if TYPE_CHECKING:
    from envoy.data.accesslog.v3 import accesslog_pb2

logger = logging.getLogger(__name__)

QUEUE_MAX = 10_000
# Workers settle in parallel, each a batch of what has arrived at once (one transaction).
WORKERS = 2
SETTLE_BATCH_MAX = 64
RETRIES_MAX = 5

# What the ledger entry of an answer cut before its first byte says (it is charged its hold).
CLIENT_LEFT_BEFORE_THE_ANSWER = "client_left_before_the_answer"

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class FinishedRequest:
    """What settlement needs from one access-log entry."""

    request_id: str
    status: int
    model: str
    usage: usage_mod.Usage | None  # None: charge the hold (a 2xx) or void (any other status)
    wallet_id: str = ""  # known when the Check admitted it: a settlement batch's lock order
    # The backend was asked but Envoy cut its answer: the client left before the first byte
    # (status 0), or Envoy's route or idle timeout ended it (UT, SI). The provider bills the
    # work all the same, so this is an unfinished answer (the hold), not a failure (void).
    cut: bool = False
    # Envoy answered 503 with no metadata: the Check failed or did not answer in time, and the
    # backend was never asked. Its hold, if the Check placed one, is voided; if none is there
    # yet, a void takes its place (holds.void_before_hold), so a Check that commits later places
    # nothing.
    check_failed: bool = False


def finished_request(entry: accesslog_pb2.HTTPAccessLogEntry) -> FinishedRequest | None:
    """The billable facts of one ``HTTPAccessLogEntry``, or None when there is nothing to settle."""
    filter_metadata = entry.common_properties.metadata.filter_metadata
    authz = filter_metadata.get(contract.AUTHZ_NAMESPACE)
    usage = filter_metadata.get(contract.USAGE_NAMESPACE)
    status = entry.response.response_code.value
    common = entry.common_properties
    reached = common.HasField("upstream_remote_address")
    return _finished(
        entry.request.request_id,
        status,
        authz=None if authz is None else (lambda name: authz[name] if name in authz.fields else None),
        usage=None if usage is None else (lambda name: usage[name] if name in usage.fields else None),
        cut=(status == 0 and reached)
        or common.response_flags.upstream_request_timeout
        or common.response_flags.stream_idle_timeout,
    )


def finished_request_from_json(line: Mapping[str, Any]) -> FinishedRequest | None:
    """The same facts from one line of Envoy's JSON access log (``envoy_config._file_access_log``:
    ``request_id``, ``status``, and the two metadata namespaces as ``authz`` and ``usage`` — the
    latter with the same ``usage``, ``usage_start`` and ``finished`` the gRPC entry carries) —
    what the sidecar settles from the access-log file (authz_sidecar/access_log_file.py) when the
    gRPC access log never delivered an entry, and ``billingproxy reconcile`` by hand."""
    authz, usage, status = line.get("authz"), line.get("usage"), line.get("status")
    request_id = line.get("request_id")
    if not isinstance(status, int) or isinstance(status, bool):
        return None
    raw_flags = line.get("flags")
    flags = raw_flags if isinstance(raw_flags, str) else ""
    reached = line.get("upstream") not in (None, "", "-")
    return _finished(
        request_id if isinstance(request_id, str) else "",
        status,
        authz=authz.get if isinstance(authz, dict) else None,
        usage=usage.get if isinstance(usage, dict) else None,
        cut=(status == 0 and reached) or bool({"UT", "SI"} & set(flags.split(","))),
    )


def _finished(
    request_id: str,
    status: int,
    *,
    authz: Callable[[str], Any] | None,
    usage: Callable[[str], Any] | None,
    cut: bool = False,
) -> FinishedRequest | None:
    """``authz`` / ``usage``: a metadata namespace's values by name (None when absent)."""
    if authz is None or authz(contract.HOLD_ID) is None:
        # A Check that timed out at Envoy may have placed its hold, or still place it, after
        # Envoy gave up; no metadata came back, so void by request id, whatever the order.
        if status == contract.CHECK_FAILED_STATUS and request_id:
            return FinishedRequest(request_id, status, model="", usage=None, check_failed=True)
        return None
    counted = _usage(request_id, status, authz(contract.FORMAT), usage)
    model, wallet_id = authz(contract.MODEL), authz(contract.WALLET_ID)
    return FinishedRequest(
        request_id=contract.metadata_read(str(authz(contract.HOLD_ID))),
        status=status,
        model=contract.metadata_read(model) if isinstance(model, str) else "",
        usage=counted,
        wallet_id=contract.metadata_read(wallet_id) if isinstance(wallet_id, str) else "",
        cut=cut,
    )


def _usage(
    request_id: str, status: int, usage_format: Any, usage: Callable[[str], Any] | None
) -> usage_mod.Usage | None:
    """The Lua filter's ``billingproxy.usage``, read by the answer's format (``billing.usage.read``):
    the exact usage, or None — charge the hold. A finished 2xx answer whose usage is unreadable is
    logged with the reason: a backend whose usage cannot be priced is an operator's problem."""
    if usage is None or not isinstance(usage_format, str):
        return None
    try:
        known_format = usage_mod.Format(contract.metadata_read(usage_format))
    except ValueError:
        logger.warning("unknown usage format %r for request %s", usage_format, request_id)
        return None
    raw, raw_start, finished = usage(contract.USAGE), usage(contract.USAGE_START), usage(contract.FINISHED)
    try:
        return usage_mod.parse(
            known_format,
            raw if isinstance(raw, str) else None,
            raw_start if isinstance(raw_start, str) else None,
            finished is True,
        )
    except usage_mod.UnreadableUsage as why:
        if finished is True and 200 <= status < 300:
            logger.warning("request %s is charged its hold: %s", request_id, why)
        return None


class Settler:
    """Prices a finished request and settles its hold, retrying transient database errors.

    Each settlement names the wallet and model the entry reports; ``billing.holds`` resolves the
    hold only when they are the hold's own (``Settlement.REFUSED_MISMATCH`` otherwise, counted in
    ``billingproxy_access_log_refusals_total{reason="hold_mismatch"}`` and logged). An entry that
    would move money but names no wallet or model is refused the same way, without asking the
    database. ``billingproxy reconcile`` settles through this class too, so its JSON lines meet
    the same check.
    """

    def __init__(self, db: database.Database, prices: pricing.PriceBook) -> None:
        self._db = db  # the sidecar's asyncpg pool: a settlement is one statement, autocommitted
        self._prices = prices

    async def settle(self, batch: list[FinishedRequest]) -> list[holds.Settlement]:
        """Settle a batch in one transaction (``billing.hold_batches.settle_many``); results in order.

        The refusals of Checks that failed (``check_failed``) first take their request ids for a
        void where no hold is there yet (``holds.void_before_hold``, one statement each, before
        the batch); the others are voided in the batch like any failed request.
        """
        outcomes: list[holds.Settlement | None] = [None] * len(batch)
        before_hold = await self._void_before_hold([done.request_id for done in batch if done.check_failed])
        requests: list[hold_batches.SettleRequest] = []
        positions: list[int] = []
        for position, done in enumerate(batch):
            if done.check_failed and done.request_id in before_hold:
                outcomes[position] = holds.Settlement.VOIDED_BEFORE_HOLD
                continue
            resolution, details = self._resolution(done)
            if resolution.posts and not (done.wallet_id and done.model):
                outcomes[position] = holds.Settlement.REFUSED_MISMATCH  # money, but for whom?
                continue
            requests.append(
                hold_batches.SettleRequest(
                    done.request_id, resolution, details, wallet_id=done.wallet_id, model=done.model
                )
            )
            positions.append(position)
        for position, outcome in zip(positions, await self._settle_many(requests), strict=True):
            outcomes[position] = outcome
        settled = [outcome for outcome in outcomes if outcome is not None]
        assert len(settled) == len(batch)
        for done, outcome in zip(batch, settled, strict=True):
            metrics.settlements.labels(outcome.value).inc()
            if outcome is holds.Settlement.REFUSED_MISMATCH:
                metrics.access_log_refusals.labels("hold_mismatch").inc()
                logger.warning(
                    "refused the access-log entry of request %s: it names wallet %r and model %r, "
                    "which is not the hold the Check recorded; the hold is left as it was",
                    done.request_id,
                    done.wallet_id,
                    done.model,
                )
        return settled

    async def _settle_many(self, requests: list[hold_batches.SettleRequest]) -> list[holds.Settlement]:
        if not requests:
            return []

        async def settle_many(conn: database.Connection) -> list[holds.Settlement]:
            return await hold_batches.settle_many(conn, requests)

        # Rolled back whole (one transaction), so the whole batch is simply tried again.
        return await self._retried(settle_many, f"settling {len(requests)} requests")

    async def _void_before_hold(self, request_ids: list[str]) -> set[str]:
        """The ids among ``request_ids`` that no hold had, now each taken by a void."""
        if not request_ids:
            return set()

        async def void_before_hold(conn: database.Connection) -> set[str]:
            # Each its own autocommitted statement (holds.void_before_hold says why). After a lost
            # connection the retry finds the voids already committed taken, and the batch then
            # finds them already voided: the same end.
            return {
                request_id for request_id in request_ids if await holds.void_before_hold(conn, request_id)
            }

        return await self._retried(void_before_hold, f"voiding {len(request_ids)} refused Checks")

    async def _retried(self, work: Callable[[database.Connection], Awaitable[T]], what: str) -> T:
        """``work`` on a pooled connection, retried while the database is unreachable."""
        for attempt in range(RETRIES_MAX):
            try:
                async with database.acquire(self._db) as conn:
                    return await work(conn)
            except Exception as exc:
                if attempt == RETRIES_MAX - 1 or not database.is_unreachable(exc):
                    raise
                logger.warning("%s failed (%s); retrying", what, exc.__class__.__name__)
                await asyncio.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable: the loop returns or raises")

    def _resolution(self, done: FinishedRequest) -> tuple[holds.Resolution, dict[str, Any]]:
        """How to resolve ``done``'s hold and the details of its ledger entry.

        The price is that of ``done.model``, the model the entry names. The settlement statement
        resolves the hold only when that is the hold's own model (the Check's, from the client's
        request), so what is charged is always the hold's model priced — never a model the entry
        alone chose.
        """
        if done.cut:
            return holds.Resolution.POST_ESTIMATE, {
                "status": done.status,
                "usage_source": "hold_estimate",
                # Status 0: the client left before the answer's first byte; else Envoy's timeout
                # ended the answer (before its first byte: 504; or mid-stream).
                "unfinished": CLIENT_LEFT_BEFORE_THE_ANSWER if done.status == 0 else "upstream_timeout",
            }
        if not 200 <= done.status < 300:
            return holds.Resolution.VOID, {"status": done.status}
        price = self._prices.price(done.model)
        if done.usage is None or price is None:
            return holds.Resolution.POST_ESTIMATE, {"status": done.status, "usage_source": "hold_estimate"}
        usage = done.usage
        try:
            cost = self._prices.cost_nano(price, usage)
        except pricing.UnpricedUsage as unpriced:
            # The Check refuses requests that could incur an unpriced dimension; a backend that
            # reports one anyway is charged the worst case, never $0 for it.
            logger.warning("request %s: %s; charging its hold", done.request_id, unpriced)
            return holds.Resolution.POST_ESTIMATE, {
                "status": done.status,
                "usage_source": "hold_estimate",
                "unpriced_usage": usage.details(),
            }
        # The settlement posts at most the hold (billing/holds.py): priced_nano shows a cost
        # the hold's estimate missed.
        return holds.Resolution.post(cost), {
            "status": done.status,
            "usage_source": "response",
            "priced_nano": cost,
            **usage.details(),
        }


class AccessLogService(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]  # Envoy's generated servicer has no types
    """Envoy's gRPC access-log stream (``StreamAccessLogs``), for Envoy only.

    ``secret`` is Settings.access_log_secret; Envoy sends it as ``x-billingproxy-access-log-secret``
    in the stream's initial metadata (envoy_config ``_grpc_access_log``). A stream without it —
    anything else that reached the gRPC port — is refused before one message is read.
    """

    def __init__(self, settler: Settler, *, secret: str) -> None:
        self._settler = settler
        self._secret = secret.encode()
        self._queue: asyncio.Queue[FinishedRequest] = asyncio.Queue(QUEUE_MAX)
        self._workers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work(), name=f"settle-{i}") for i in range(WORKERS)]

    async def drain(self) -> None:
        """Settle everything already received (on shutdown), then stop the workers."""
        await self._queue.join()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    def _authentic(self, metadata: grpc.aio.Metadata | None) -> bool:
        """Exactly one secret, equal to ours, compared in constant time."""
        sent = [value for key, value in (metadata or ()) if key == contract.ACCESS_LOG_SECRET_HEADER]
        if len(sent) != 1 or not self._secret or not isinstance(sent[0], str):
            return False
        return hmac.compare_digest(sent[0].encode(), self._secret)

    async def StreamAccessLogs(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[als_pb2.StreamAccessLogsMessage, als_pb2.StreamAccessLogsResponse],
    ) -> als_pb2.StreamAccessLogsResponse:
        if not self._authentic(context.invocation_metadata()):
            metrics.access_log_refusals.labels("unauthenticated").inc()
            logger.warning(
                "refused an access-log stream from %s: the access-log secret is missing or wrong",
                context.peer(),
            )
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "access-log secret missing or wrong")
        async for message in request_iterator:
            for entry in message.http_logs.log_entry:
                done = finished_request(entry)
                if done is not None:
                    await self._queue.put(done)
        return als_pb2.StreamAccessLogsResponse()

    async def _work(self) -> None:
        while True:
            batch = [await self._queue.get()]
            # Whatever else has arrived goes in the same transaction (group commit).
            while len(batch) < SETTLE_BATCH_MAX and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._settler.settle(batch)
            except Exception:
                metrics.settlement_failures.inc(len(batch))
                logger.exception(
                    "could not settle requests %s; their holds will expire",
                    ", ".join(done.request_id for done in batch),
                )
            finally:
                for _ in batch:
                    self._queue.task_done()
