"""authz_sidecar.check_http: the Check's HTTP face, over a real socket, with a stand-in rule.

The billing rule itself (``check.Decider._admit_or_raise``) is exercised through Envoy in tests/e2e; here a
small stand-in decides, so each test controls exactly what the rule answers and when.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from support.waiting import wait_until

from authz_sidecar import api_errors, check
from authz_sidecar.check_http import CheckServer


class Rule(check.Decider):
    """The real Decider's answering (``decide``: metrics, fail-closed) around a stand-in decision
    by path: /v1/ok admits, /v1/deny denies, /v1/boom fails, /v1/slow waits."""

    def __init__(self) -> None:  # no database, no prices: ``_admit_or_raise`` below is all it needs
        self.seen: list[dict[str, Any]] = []
        self.release = asyncio.Event()
        self.slow_started = asyncio.Event()
        self.slow_cancelled = asyncio.Event()

    async def _admit_or_raise(
        self, *, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> dict[str, str]:
        self.seen.append({"method": method, "path": path, "headers": headers, "body": body})
        if path.startswith("/v1/deny"):
            raise api_errors.funds_reserved(retry_after_s=1)
        if path.startswith("/v1/boom"):
            raise RuntimeError("secret internals")
        if path.startswith("/v1/slow"):
            self.slow_started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.slow_cancelled.set()
                raise
        return {"hold_id": "req-1", "model": "we\r\nird/model ü"}


@pytest.fixture
async def served():
    async def start(body_bytes_max: int = 1024):
        rule = Rule()
        server = CheckServer(rule, body_bytes_max=body_bytes_max)  # Rule stands in for check.Decider
        await server.start("127.0.0.1", 0)
        port = server._server.sockets[0].getsockname()[1]
        started.append(server)
        return rule, port

    started: list[CheckServer] = []
    yield start
    for server in started:
        await server.stop()


async def exchange(port: int, raw: bytes, *, answers: int = 1) -> list[tuple[int, dict[str, str], bytes]]:
    """Send raw bytes, read ``answers`` responses (or until the server closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    responses = []
    try:
        for _ in range(answers):
            status_line = await asyncio.wait_for(reader.readline(), timeout=5)
            if not status_line:
                break
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            responses.append((int(status_line.split()[1]), headers, body))
    finally:
        writer.close()
    return responses


def post(path: str, body: bytes = b'{"model":"m"}', **headers: str) -> bytes:
    head = f"POST /check{path} HTTP/1.1\r\nhost: gateway\r\ncontent-length: {len(body)}\r\n"
    head += "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body


async def test_admission_carries_the_facts_and_no_credential(served) -> None:
    rule, port = await served()
    [(status, headers, body)] = await exchange(
        port, post("/v1/ok?x=1", authorization="Bearer sk-client", x_request_id="r1")
    )
    assert (status, body) == (200, b"")
    # Nothing a local process holding a client key could learn: the backend route sets the credential.
    assert not {"authorization", "x-api-key", "x-envoy-auth-headers-to-remove"} & set(headers)
    # The facts for the access log, header-safe (the model name comes from the client's body).
    assert headers["x-billingproxy-hold-id"] == "req-1"
    assert headers["x-billingproxy-model"] == "we%0D%0Aird%2Fmodel%20%C3%BC"
    # The rule sees the client's path (prefix stripped), its headers and body.
    assert rule.seen[0]["path"] == "/v1/ok?x=1"
    assert rule.seen[0]["headers"]["authorization"] == "Bearer sk-client"
    assert rule.seen[0]["headers"]["x-request-id"] == "r1"
    assert rule.seen[0]["body"] == b'{"model":"m"}'


async def test_a_denial_is_the_clients_answer(served) -> None:
    _, port = await served()
    [(status, headers, body)] = await exchange(port, post("/v1/deny"))
    assert status == 429
    assert headers["content-type"] == "application/json"
    assert headers["retry-after"] == "1"
    assert b'"code":"funds_reserved"' in body
    assert not [h for h in headers if h.startswith("x-billingproxy-")]


async def test_a_failing_rule_answers_503_without_internals(served) -> None:
    _, port = await served()
    [(status, _, body)] = await exchange(port, post("/v1/boom"))
    assert status == 503
    assert b"billing_unavailable" in body and b"secret" not in body


async def test_requests_on_one_connection_are_answered_in_order(served) -> None:
    rule, port = await served()
    pipelined = post("/v1/ok") + post("/v1/deny") + post("/v1/ok", b'{"model":"second"}')
    answers = await exchange(port, pipelined, answers=3)
    assert [status for status, _, _ in answers] == [200, 429, 200]
    assert [seen["body"] for seen in rule.seen] == [b'{"model":"m"}', b'{"model":"m"}', b'{"model":"second"}']


async def test_connection_close_is_honoured(served) -> None:
    _, port = await served()
    answers = await exchange(port, post("/v1/ok", connection="close") + post("/v1/ok"), answers=2)
    assert [status for status, _, _ in answers] == [200]


async def test_a_body_in_pieces_is_read_whole(served) -> None:
    rule, port = await served()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = post("/v1/ok", b'{"model":"in pieces"}')
    for i in range(0, len(raw), 7):
        writer.write(raw[i : i + 7])
        await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), timeout=5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 200")
    assert rule.seen[0]["body"] == b'{"model":"in pieces"}'


@pytest.mark.parametrize(
    "raw", [b"NOT HTTP AT ALL\r\n\r\n", b"POST /check/v1/ok HTTP/1.1\r\ncontent-length: x\r\n\r\n"]
)
async def test_malformed_http_is_answered_400_and_closed(served, raw: bytes) -> None:
    rule, port = await served()
    answers = await exchange(port, raw + post("/v1/ok"), answers=2)
    assert [status for status, _, _ in answers] == [400]
    assert rule.seen == []


async def test_a_body_beyond_the_limit_is_refused_413(served) -> None:
    rule, port = await served(body_bytes_max=1024)
    answers = await exchange(port, post("/v1/ok", b"x" * (1024 + 64 * 1024 + 1)))
    assert [status for status, _, _ in answers] == [413]
    assert rule.seen == []


async def test_headers_beyond_what_envoy_sends_are_refused_431(served) -> None:
    rule, port = await served()
    answers = await exchange(port, post("/v1/ok", x_padding="p" * (100 * 1024)))
    assert [status for status, _, _ in answers] == [431]
    assert rule.seen == []


async def test_a_client_that_pipelines_far_ahead_is_still_answered_in_order(served) -> None:
    # More requests at once than PIPELINE_MAX: reading pauses and resumes; none is lost.
    rule, port = await served()
    requests = [post("/v1/ok", f'{{"model":"m{n}"}}'.encode()) for n in range(30)]
    answers = await exchange(port, b"".join(requests), answers=30)
    assert [status for status, _, _ in answers] == [200] * 30
    assert [seen["body"] for seen in rule.seen] == [f'{{"model":"m{n}"}}'.encode() for n in range(30)]


async def test_envoy_hanging_up_stops_the_decision(served) -> None:
    rule, port = await served()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post("/v1/slow"))
    await writer.drain()
    await asyncio.wait_for(rule.slow_started.wait(), timeout=5)
    writer.close()
    await asyncio.wait_for(rule.slow_cancelled.wait(), timeout=5)


async def test_stop_lets_a_check_in_progress_answer_first() -> None:
    rule = Rule()
    server = CheckServer(rule, body_bytes_max=1024)  # Rule stands in for check.Decider
    await server.start("127.0.0.1", 0)
    port = server._server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(post("/v1/slow"))
    await writer.drain()
    await asyncio.wait_for(rule.slow_started.wait(), timeout=5)
    stopping = asyncio.ensure_future(server.stop())

    async def stopped_listening() -> bool:
        return not server._server.is_serving()

    await wait_until(stopped_listening, 5, "the server closing its listener")
    assert not stopping.done()  # stopping, and waiting for the Check in progress
    rule.release.set()
    status_line = await asyncio.wait_for(reader.readline(), timeout=5)
    assert status_line.startswith(b"HTTP/1.1 200")
    await asyncio.wait_for(stopping, timeout=5)
    await asyncio.wait_for(reader.read(), timeout=5)  # the rest of the answer, then the close
    assert reader.at_eof()
    writer.close()
