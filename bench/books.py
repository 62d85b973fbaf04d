"""What each client saw, and the ledger that must match it: the exactly-once books of a load run
through faults (the fault tests in ``tests/e2e/faults/`` and ``python -m bench --chaos``).

Why a record kept by the client: the sidecar's own view is what is under test. A request is
judged by what its client saw (the status, Envoy's ``x-request-id``, whether the answer reached
its end and the usage it reported) and by what the demo backend says reached it, never by what
the sidecar believes it settled. The expected charges come from the project's price book and
the Check's own estimator (``authz_sidecar.check.worst_case_nano``), so a hold or a charge that
drifts from docs/pricing.md shows here.

What a client can see of one request, and what the ledger then owes (:func:`compare`):

- **complete** — a 2xx whose answer reached its end (JSON with usage; a stream's terminal event):
  exactly one ``usage:<request id>`` entry, of exactly the price of the usage it reported — or,
  when it ended the moment Envoy was SIGKILLed, of its hold, charged because no log reported it
  (Envoy's last reports die with it: docs/failures.md);
- **cut** — a 2xx that ended early, or Envoy's 504 (the backend was asked, no answer came):
  exactly one entry, of the price of the demo backend's usage (Envoy saw the end) or of the hold
  (it did not); never $0, since the backend did the work;
- **lost** — no status at all (the connection failed): the client has no request id, so at most
  one entry per lost request, on its wallet, of one of those two amounts (matched by amount);
- **refused** — any other status (403, 429, 503 …): nothing charged, and the backend never saw it.

Then every hold of the run's wallets is resolved (posted or voided, none pending or expired),
every request the backend saw is charged once, each wallet moved by exactly what its entries
say, and the ledger audit (``billing.audit``, what ``billingproxy audit`` runs) finds nothing.

A charge of a request the backend never saw is a difference too ("charged, not served"), with
one exception, counted apart: a hold charged its estimate for want of any report
(billing/expiry.py) whose request was in flight when Envoy was SIGKILLed — Envoy died between
its Check and the backend, and no log reports a request it dies with (docs/failures.md). Such a
hold is placed before the kill, or by a Check Envoy sent just before it, a moment after.

Sharp edge: "cut" and "lost" allow two amounts, so the books prove "once, and one of the two
right amounts", not which of the two; the complete requests carry the exact-price proof.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import aiohttp
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from authz_sidecar import access_log, check, envoy_config
from billing import audit, endpoints, expiry, pricing
from billing.usage import Format, UnreadableUsage, Usage, parse as parse_usage
from billingproxy.devstack import demo_backend

# Every hold ends in one of these; "pending" and "expired" are not an end.
RESOLVED_STATES = frozenset({"posted", "voided"})
# Envoy's answer when the backend was asked and no answer came in time: charged the hold.
UPSTREAM_TIMEOUT_STATUS = 504
# A SIGKILLed Envoy takes with it the reports it had not written yet: its file log is written
# every FILE_FLUSH_INTERVAL_MS (its gRPC log every 10 ms). Twice that, as the timer may run late.
REPORTS_LOST_S = 2 * envoy_config.FILE_FLUSH_INTERVAL_MS / 1000
# What the entry of a request whose answer was cut before its first byte says: a graceful stop of
# Envoy cuts the requests in flight, some while Envoy was still connecting to the backend.
CUT_BEFORE_THE_ANSWER = access_log.CLIENT_LEFT_BEFORE_THE_ANSWER
# A Check Envoy sent just before it was SIGKILLed may place its hold a moment after (the sidecar
# does not know Envoy died): this long, generous beside a Check's few milliseconds.
CHECK_AFTER_KILL_S = 1.0
# What billing/expiry.py writes in the entry of a hold no log reported, charged its estimate.
UNREPORTED = expiry.UNREPORTED_DETAILS["unfinished"]


# --- what is sent --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    """One kind of request the load sends: an endpoint, a body, and the demo backend's pacing
    (``x-demo-*`` headers: a stream that takes a while is what a fault can cut)."""

    name: str
    path: str
    request: Mapping[str, Any]
    demo_headers: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def body(self) -> bytes:
        return json.dumps(self.request).encode()

    @property
    def model(self) -> str:
        model: str = self.request["model"]
        return model

    @property
    def stream(self) -> bool:
        return self.request.get("stream") is True

    @property
    def endpoint(self) -> endpoints.Endpoint:
        found = endpoints.EndpointTable().find("POST", self.path)
        assert found is not None and found.usage_format is not None, f"{self.path} is not metered"
        return found

    @property
    def usage_format(self) -> Format:
        usage_format = self.endpoint.usage_format
        assert usage_format is not None
        return usage_format

    def demo_usage(self) -> Usage:
        """What the demo backend reports for this request (its documented arithmetic): the exact
        usage of an answer the client did not see end."""
        messages = self.request["messages"]
        if self.usage_format is Format.ANTHROPIC_MESSAGES:
            output, _ = demo_backend.output_limit(dict(self.request), "max_tokens")
            return Usage(input_text=demo_backend.prompt_tokens(messages), output_text=output)
        assert self.usage_format is Format.OPENAI_CHAT, self.usage_format
        return Usage.tokens(
            prompt_tokens=demo_backend.prompt_tokens(messages),
            completion_tokens=demo_backend.completion_tokens(dict(self.request)),
        )


_QUESTION = "Where is my parcel 48213-B? It was due on Tuesday and still says label created."

# Streams are paced so that a fault lands mid-answer; answers stay far below any timeout.
STREAM_PACING = {"x-demo-chunk-delay-ms": "15"}
JSON_PACING = {"x-demo-delay-ms": "40"}

SHAPES: tuple[Shape, ...] = (
    Shape(
        "chat",
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": _QUESTION}], "max_tokens": 16},
        JSON_PACING,
    ),
    Shape(
        "chat stream",
        "/v1/chat/completions",
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": _QUESTION}],
            "max_tokens": 24,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        STREAM_PACING,
    ),
    Shape(
        "messages",
        "/v1/messages",
        {"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": _QUESTION}], "max_tokens": 12},
        JSON_PACING,
    ),
    Shape(
        "messages stream",
        "/v1/messages",
        {
            "model": "claude-haiku-4-5",
            "messages": [{"role": "user", "content": _QUESTION}],
            "max_tokens": 20,
            "stream": True,
        },
        STREAM_PACING,
    ),
)


class Tariff:
    """The two amounts a request may be charged: the price of its usage, and its hold."""

    def __init__(self, prices: pricing.PriceBook) -> None:
        self._prices = prices

    def _price(self, shape: Shape) -> pricing.ModelPrice:
        price = self._prices.price(shape.model)
        assert price is not None, f"the price book has no {shape.model}"
        return price

    def exact_nano(self, shape: Shape, usage: Usage) -> int:
        return self._prices.cost_nano(self._price(shape), usage)

    def hold_nano(self, shape: Shape) -> int:
        """What the Check holds for ``shape``: its own estimator, on the very bytes sent."""
        price = self._price(shape)
        read = shape.endpoint.read
        assert read is not None
        worst = read(shape.request, price.max_output_tokens)
        return check.worst_case_nano(self._prices, price, worst, len(shape.body))[1]

    def allowed_nano(self, shape: Shape) -> frozenset[int]:
        """A request whose end the client did not see: the exact price or the hold."""
        return frozenset({self.exact_nano(shape, shape.demo_usage()), self.hold_nano(shape)})


# --- what a client saw ---------------------------------------------------------------------------


class Outcome(enum.Enum):
    COMPLETE = "complete"
    CUT = "cut"
    LOST = "lost"
    REFUSED = "refused"


@dataclasses.dataclass
class Seen:
    """One request, as its client saw it. Times are ``time.time()`` (the database's clock too)."""

    shape: Shape
    wallet_id: str
    started_at: float
    ended_at: float = 0.0
    status: int | None = None
    request_id: str | None = None
    error_code: str | None = None  # the gateway's refusal code, from its JSON error
    finished: bool = False  # the answer reached its end (JSON read whole; the terminal event)
    usage: Usage | None = None  # what the answer reported, when it finished with a readable usage
    failure: str | None = None  # the exception that ended the exchange, by name

    @property
    def outcome(self) -> Outcome:
        if self.status is None:
            return Outcome.LOST
        if 200 <= self.status < 300:
            return Outcome.COMPLETE if self.usage is not None else Outcome.CUT
        if self.status == UPSTREAM_TIMEOUT_STATUS:
            return Outcome.CUT
        return Outcome.REFUSED

    def describe(self) -> str:
        return (
            f"{self.shape.name} request {self.request_id or '(no id)'} on {self.wallet_id}: status "
            f"{self.status}{f' {self.error_code}' if self.error_code else ''}, "
            f"{'finished' if self.finished else 'not finished'}"
            f"{f', {self.failure}' if self.failure else ''}"
        )


async def send(
    session: aiohttp.ClientSession, gateway: str, shape: Shape, api_key: str, wallet_id: str
) -> Seen:
    """Send one request of ``shape`` and record what came back; never raises for what a fault
    does to the exchange (a refused connection, a reset, a body cut short)."""
    seen = Seen(shape, wallet_id, started_at=time.time())
    headers = {"authorization": f"Bearer {api_key}", "content-type": "application/json", **shape.demo_headers}
    try:
        async with session.post(gateway + shape.path, data=shape.body, headers=headers) as response:
            seen.status = response.status
            seen.request_id = response.headers.get("x-request-id")
            if not 200 <= response.status < 300:
                seen.error_code = _error_code(await response.read())
            elif shape.stream:
                await _read_stream(response, shape.usage_format, seen)
            else:
                answer = json.loads(await response.read())
                seen.finished = True
                seen.usage = _usage(shape.usage_format, answer.get("usage"), None)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        seen.failure = type(exc).__name__
    seen.ended_at = time.time()
    return seen


def _error_code(body: bytes) -> str | None:
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code if isinstance(code, str) else None


def _usage(usage_format: Format, usage: Any, usage_start: Any) -> Usage | None:
    if usage is None:
        return None
    start = None if usage_start is None else json.dumps(usage_start)
    try:
        return parse_usage(usage_format, json.dumps(usage), start, True)
    except UnreadableUsage:
        return None


async def _read_stream(response: aiohttp.ClientResponse, usage_format: Format, seen: Seen) -> None:
    """Server-sent events up to the terminal one: ``data: [DONE]`` (OpenAI) or ``message_stop``
    (Anthropic); the usage where each format carries it (billing/usage.py)."""
    usage: Any = None
    usage_start: Any = None
    async for raw in response.content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            seen.finished = True
            break
        event = json.loads(data)
        kind = event.get("type")
        if usage_format is Format.ANTHROPIC_MESSAGES:
            if kind == "message_start":
                usage_start = event["message"]["usage"]
            elif kind == "message_delta":
                usage = event["usage"]
            elif kind == "message_stop":
                seen.finished = True
                break
        elif isinstance(event.get("usage"), dict):
            usage = event["usage"]
    if seen.finished:
        seen.usage = _usage(usage_format, usage, usage_start)


# --- what the ledger says ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Charge:
    wallet_id: str
    amount_nano: int  # what was taken from the wallet (the entry's amount, negated)
    usage_source: str  # "response" (the price of the reported usage) or "hold_estimate"
    created_at: float
    unfinished: str = ""  # for an estimate, why (the entry's details: no_access_log_report, …)

    @property
    def how(self) -> str:
        return f"{self.usage_source}: {self.unfinished}" if self.unfinished else self.usage_source


@dataclasses.dataclass(frozen=True)
class Hold:
    wallet_id: str
    amount_nano: int
    state: str
    created_at: float
    resolved_at: float | None


@dataclasses.dataclass(frozen=True)
class LedgerView:
    """The run's wallets as PostgreSQL has them, read in one snapshot."""

    charges: dict[str, Charge]  # by request id (the entry's key is usage:<request id>)
    other_entries: dict[str, int]  # wallet id → Σ of its entries that are not usage charges
    holds: dict[str, Hold]  # by request id
    balances: dict[str, tuple[int, int]]  # wallet id → (balance, reserved)
    audit_findings: list[str]  # billing.audit's, over the whole database, in the same snapshot


async def read_ledger(engine: AsyncEngine, wallet_ids: Iterable[str], *, report_grace_s: int) -> LedgerView:
    """The run's wallets and the audit, in one read-only snapshot (``billing.audit.snapshot``);
    ``report_grace_s``: the stack's BILLINGPROXY_HOLD_REPORT_GRACE_S, which the audit checks."""
    ids = {"ids": sorted(set(wallet_ids))}
    async with audit.snapshot(engine) as conn:
        entries = (
            await conn.execute(
                sa.text(
                    "SELECT wallet_id, idempotency_key, kind, amount_nano, "
                    "details->>'usage_source' AS source, details->>'unfinished' AS unfinished, created_at "
                    "FROM ledger_entries WHERE wallet_id = ANY(:ids)"
                ),
                ids,
            )
        ).all()
        holds = (
            await conn.execute(
                sa.text(
                    "SELECT request_id, wallet_id, amount_nano, state, created_at, resolved_at FROM holds "
                    "WHERE wallet_id = ANY(:ids)"
                ),
                ids,
            )
        ).all()
        wallets = (
            await conn.execute(
                sa.text("SELECT id, balance_nano, reserved_nano FROM wallets WHERE id = ANY(:ids)"), ids
            )
        ).all()
        report = await audit.check(conn, report_grace_s=report_grace_s)
    charges: dict[str, Charge] = {}
    other: Counter[str] = Counter()
    for row in entries:
        if row.kind == "usage" and row.idempotency_key.startswith("usage:"):
            charges[row.idempotency_key.removeprefix("usage:")] = Charge(
                row.wallet_id,
                -row.amount_nano,
                row.source or "",
                row.created_at.timestamp(),
                row.unfinished or "",
            )
        else:
            other[row.wallet_id] += row.amount_nano
    return LedgerView(
        charges=charges,
        other_entries=dict(other),
        holds={
            row.request_id: Hold(
                row.wallet_id,
                row.amount_nano,
                row.state,
                row.created_at.timestamp(),
                None if row.resolved_at is None else row.resolved_at.timestamp(),
            )
            for row in holds
        },
        balances={row.id: (row.balance_nano, row.reserved_nano) for row in wallets},
        audit_findings=[str(finding) for finding in report.findings],
    )


async def backend_arrivals(session: aiohttp.ClientSession, backend_url: str, since: int = 0) -> list[str]:
    """The request ids the demo backend saw (``GET /_demo/requests``), in order of arrival, from
    the ``since``-th on (a run's own: ``since`` = how many there were before it began)."""
    async with session.get(backend_url + "/_demo/requests") as response:
        response.raise_for_status()
        body = await response.json()
    assert body["dropped"] == 0, f"the demo backend dropped {body['dropped']} request ids"
    ids: list[str] = body["request_ids"]
    return ids[since:]


async def unresolved_holds(engine: AsyncEngine, wallet_ids: Iterable[str]) -> int:
    """Holds of these wallets not yet posted or voided: what a run waits on before its books."""
    async with engine.connect() as conn:
        count: int = (
            await conn.execute(
                sa.text(
                    "SELECT count(*) FROM holds "
                    "WHERE wallet_id = ANY(:ids) AND state NOT IN ('posted', 'voided')"
                ),
                {"ids": sorted(set(wallet_ids))},
            )
        ).scalar_one()
    return count


# --- the comparison ------------------------------------------------------------------------------


@dataclasses.dataclass
class Verdict:
    """The books of a run: counts, and every discrepancy in words (empty: exactly once)."""

    outcomes: Counter[str] = dataclasses.field(default_factory=Counter)
    admitted: int = 0  # holds placed on the run's wallets
    served: int = 0  # requests that reached the backend (its own record)
    settled: int = 0  # holds posted or voided
    charged: int = 0  # usage entries
    voided: int = 0  # holds voided
    charged_estimate: int = 0  # of the charges, those of a hold's estimate
    # Complete requests charged their hold because a SIGKILLed Envoy took their reports with it.
    estimated_after_envoy_kill: int = 0
    # Charged their hold's estimate though they never reached the backend, in flight when Envoy
    # was SIGKILLed (billing/expiry.py charges an unreported hold: the durable record cannot tell
    # it from one that was served). The policy, not a difference: counted so a run shows it.
    unserved_estimated_after_envoy_kill: int = 0
    served_not_charged: int = 0
    # Charged though the backend never saw the request, other than the exception above.
    charged_not_served: int = 0
    unserved_charges: list[str] = dataclasses.field(default_factory=list)  # those, in words
    longest_unsettled_s: float = 0.0  # a served request's end (the client's clock) → its hold resolved
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def differences(self) -> dict[str, int]:
        """What must be 0."""
        return {
            "admitted - settled": self.admitted - self.settled,
            "settled - (charged + voided)": self.settled - (self.charged + self.voided),
            "served, not charged": self.served_not_charged,
            "charged, not served": self.charged_not_served,
            "problems": len(self.problems),
        }

    @property
    def exact(self) -> bool:
        return not any(self.differences.values())


def compare(
    seen: Sequence[Seen],
    view: LedgerView,
    tariff: Tariff,
    initial_balances: Mapping[str, int],
    arrivals: Sequence[str],
    envoy_killed_at: Sequence[float] = (),
    envoy_stopped_at: Sequence[float] = (),
) -> Verdict:
    """The books of a run: ``seen`` (every request the clients sent) against ``view`` (the ledger
    of the run's wallets, whose balances were ``initial_balances`` before it) and ``arrivals``
    (the request ids the backend saw meanwhile). See the module docstring for the rules.

    ``envoy_killed_at``: when (``time.time()``) the run SIGKILLed Envoy, if it did: a complete
    request that ended within :data:`REPORTS_LOST_S` of one may be charged its hold instead of
    its price (docs/failures.md, "Envoy killed"), and is counted in
    ``Verdict.estimated_after_envoy_kill``; a request in flight at one that never reached the
    backend may be charged its hold's estimate, counted in
    ``Verdict.unserved_estimated_after_envoy_kill``. ``envoy_stopped_at``: when the run stopped
    Envoy gracefully (SIGTERM, no drain): it cuts the requests in flight too, so a request in
    flight then that never reached the backend may be charged its hold the same way — unreported,
    or cut before the answer while Envoy was connecting to the backend — and counted there too;
    every complete request is still charged its exact price."""
    verdict = Verdict(outcomes=Counter(s.outcome.value for s in seen))
    problems = verdict.problems
    by_id: dict[str, Seen] = {}
    for one in seen:
        if one.request_id is not None:
            if one.request_id in by_id:
                problems.append(f"two answers carry request id {one.request_id}")
            by_id[one.request_id] = one

    for request_id, one in by_id.items():
        charge = view.charges.get(request_id)
        hold = view.holds.get(request_id)
        outcome = one.outcome
        if outcome is Outcome.REFUSED:
            if charge is not None:
                problems.append(f"{one.describe()}: refused, yet charged {charge.amount_nano}")
            continue
        if hold is not None and hold.amount_nano != tariff.hold_nano(one.shape):
            problems.append(
                f"{one.describe()}: held {hold.amount_nano}, the Check's estimator says "
                f"{tariff.hold_nano(one.shape)}"
            )
        if outcome is Outcome.COMPLETE:
            assert one.usage is not None
            expected = {tariff.exact_nano(one.shape, one.usage)}
            if _report_died_with_envoy(one, charge, envoy_killed_at, tariff):
                verdict.estimated_after_envoy_kill += 1
                continue
        else:
            expected = set(tariff.allowed_nano(one.shape))
        if charge is None:
            problems.append(
                f"{one.describe()}: reached the backend, never charged (expected {sorted(expected)})"
            )
        elif charge.amount_nano not in expected:
            problems.append(
                f"{one.describe()}: charged {charge.amount_nano} ({charge.how}), "
                f"expected {' or '.join(map(str, sorted(expected)))}"
            )
        elif charge.wallet_id != one.wallet_id:
            problems.append(f"{one.describe()}: charged to {charge.wallet_id}")

    _match_lost(seen, view, tariff, set(by_id), problems)
    _check_holds(view, problems)
    _check_arrivals(arrivals, view, by_id, problems)
    _check_balances(view, initial_balances, problems)
    problems.extend(f"audit: {finding}" for finding in view.audit_findings)

    verdict.admitted = len(view.holds)
    verdict.settled = sum(1 for h in view.holds.values() if h.state in RESOLVED_STATES)
    verdict.voided = sum(1 for h in view.holds.values() if h.state == "voided")
    verdict.charged = len(view.charges)
    verdict.charged_estimate = sum(1 for c in view.charges.values() if c.usage_source == "hold_estimate")
    verdict.served = len(set(arrivals))
    verdict.served_not_charged = len(set(arrivals) - set(view.charges))
    for request_id in sorted(set(view.charges) - set(arrivals)):
        if _unserved_in_flight_at_envoy_kill(request_id, view, seen, [*envoy_killed_at, *envoy_stopped_at]):
            verdict.unserved_estimated_after_envoy_kill += 1
        else:
            verdict.charged_not_served += 1
            charge = view.charges[request_id]
            verdict.unserved_charges.append(
                f"request {request_id} charged {charge.amount_nano} ({charge.how}) to {charge.wallet_id}, "
                "never served"
            )
    verdict.longest_unsettled_s = _longest_unsettled(view, by_id, arrivals)
    return verdict


def _report_died_with_envoy(
    one: Seen, charge: Charge | None, envoy_killed_at: Sequence[float], tariff: Tariff
) -> bool:
    """A complete request charged its hold because a SIGKILL took its reports with Envoy: it
    ended within REPORTS_LOST_S of the kill, and no log reported it."""
    return (
        charge is not None
        and charge.unfinished == UNREPORTED
        and charge.amount_nano == tariff.hold_nano(one.shape)
        and any(abs(one.ended_at - killed) <= REPORTS_LOST_S for killed in envoy_killed_at)
    )


def _unserved_in_flight_at_envoy_kill(
    request_id: str, view: LedgerView, seen: Sequence[Seen], envoy_killed_at: Sequence[float]
) -> bool:
    """A charge of a request the backend never saw that a SIGKILLed or stopped Envoy explains: its
    hold's own amount, charged for want of any report (or as an answer cut before it began), and
    the hold was placed during a request on its wallet that was still in flight (no answer, or one
    cut short) when Envoy was killed or stopped — before it, or by a Check sent before it within
    :data:`CHECK_AFTER_KILL_S`."""
    charge = view.charges[request_id]
    hold = view.holds.get(request_id)
    if (
        hold is None
        or charge.unfinished not in (UNREPORTED, CUT_BEFORE_THE_ANSWER)
        or charge.amount_nano != hold.amount_nano
    ):
        return False
    return any(
        one.wallet_id == hold.wallet_id
        and one.outcome in (Outcome.LOST, Outcome.CUT)
        and one.started_at <= killed <= one.ended_at
        and one.started_at <= hold.created_at <= killed + CHECK_AFTER_KILL_S
        for killed in envoy_killed_at
        for one in seen
    )


def _match_lost(
    seen: Sequence[Seen], view: LedgerView, tariff: Tariff, known: set[str], problems: list[str]
) -> None:
    """Charges whose request id no client saw must each belong to a different lost request on
    the same wallet, of one of its two amounts: a maximum matching (Kuhn's augmenting paths)."""
    lost = [s for s in seen if s.outcome is Outcome.LOST]
    strangers = sorted((rid, c) for rid, c in view.charges.items() if rid not in known)
    if not strangers:
        return
    allowed = [tariff.allowed_nano(s.shape) for s in lost]
    candidates = [
        [
            i
            for i, s in enumerate(lost)
            if s.wallet_id == charge.wallet_id and charge.amount_nano in allowed[i]
        ]
        for _, charge in strangers
    ]
    owner: dict[int, int] = {}  # lost request → stranger charge

    def augment(charge: int, visited: set[int]) -> bool:
        for request in candidates[charge]:
            if request in visited:
                continue
            visited.add(request)
            if request not in owner or augment(owner[request], visited):
                owner[request] = charge
                return True
        return False

    for index, (request_id, charge) in enumerate(strangers):
        if not augment(index, set()):
            problems.append(
                f"request {request_id} charged {charge.amount_nano} to {charge.wallet_id}: no request the "
                "clients sent accounts for it"
            )


def _check_holds(view: LedgerView, problems: list[str]) -> None:
    for request_id, hold in sorted(view.holds.items()):
        charged = request_id in view.charges
        if hold.state not in RESOLVED_STATES:
            problems.append(f"hold {request_id} on {hold.wallet_id} left {hold.state}")
        elif (hold.state == "posted") != charged:
            problems.append(
                f"hold {request_id} is {hold.state} but {'has' if charged else 'has no'} usage entry"
            )
    for request_id in sorted(set(view.charges) - set(view.holds)):
        problems.append(f"usage entry {request_id} has no hold")


def _check_arrivals(
    arrivals: Sequence[str], view: LedgerView, by_id: Mapping[str, Seen], problems: list[str]
) -> None:
    for request_id, times in Counter(arrivals).items():
        if times > 1:
            problems.append(f"the backend saw request {request_id} {times} times")
        one = by_id.get(request_id)
        if one is not None and one.outcome is Outcome.REFUSED:
            problems.append(f"{one.describe()}: refused, yet the backend served it")
        elif request_id not in view.charges:
            problems.append(f"request {request_id} reached the backend, never charged")


def _check_balances(view: LedgerView, initial: Mapping[str, int], problems: list[str]) -> None:
    charged: Counter[str] = Counter()
    for charge in view.charges.values():
        charged[charge.wallet_id] += charge.amount_nano
    for wallet_id, before in sorted(initial.items()):
        balance, reserved = view.balances[wallet_id]
        expected = before - charged[wallet_id]
        if balance != expected:
            problems.append(
                f"wallet {wallet_id}: balance {balance}, expected {before} - {charged[wallet_id]} charged = "
                f"{expected}"
            )
        if view.other_entries.get(wallet_id, 0) != before:
            problems.append(
                f"wallet {wallet_id}: entries other than usage charges add up to "
                f"{view.other_entries.get(wallet_id, 0)}, not its balance before the run ({before})"
            )
        if reserved != 0:
            problems.append(f"wallet {wallet_id}: {reserved} still reserved")


def _longest_unsettled(view: LedgerView, by_id: Mapping[str, Seen], arrivals: Sequence[str]) -> float:
    """For each request the backend served: from its end (the client's clock, or its hold's
    creation when the client never saw it end) to its hold's resolution."""
    longest = 0.0
    for request_id in arrivals:
        hold = view.holds.get(request_id)
        if hold is None or hold.resolved_at is None:
            continue
        one = by_id.get(request_id)
        ended = one.ended_at if one is not None else hold.created_at
        longest = max(longest, hold.resolved_at - ended)
    return longest


def render(verdict: Verdict) -> str:
    """The books as the chaos run prints them."""
    o = verdict.outcomes
    lines = [
        f"requests sent {sum(o.values())}: complete {o['complete']}, cut {o['cut']}, lost (no answer) "
        f"{o['lost']}, refused {o['refused']}",
        f"admitted {verdict.admitted}, served {verdict.served}, settled {verdict.settled}, "
        f"charged {verdict.charged} (of them the hold's estimate {verdict.charged_estimate}), "
        f"voided {verdict.voided}",
        "charged the hold's estimate because Envoy was killed or stopped with them: in flight, never "
        f"served {verdict.unserved_estimated_after_envoy_kill}; "
        f"complete {verdict.estimated_after_envoy_kill}",
        "differences (each must be 0): "
        + ", ".join(f"{name} = {value}" for name, value in verdict.differences.items()),
        f"longest a served request stayed unsettled: {verdict.longest_unsettled_s:.2f} s",
    ]
    lines += [f"  charged, not served: {line}" for line in verdict.unserved_charges[:50]]
    lines += [f"  problem: {p}" for p in verdict.problems[:50]]
    if len(verdict.problems) > 50:
        lines.append(f"  … and {len(verdict.problems) - 50} more")
    return "\n".join(lines)


async def wait_resolved(engine: AsyncEngine, wallet_ids: Iterable[str], timeout_s: float) -> bool:
    """Until every hold of these wallets is posted or voided (True), or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while await unresolved_holds(engine, wallet_ids):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True
