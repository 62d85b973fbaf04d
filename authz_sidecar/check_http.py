"""Envoy's ext_authz over HTTP: how each /v1/ request reaches :class:`check.Decider`.

The default flavour (``BILLINGPROXY_CHECK_TRANSPORT=http``; the gRPC one is check_grpc.py). Why
HTTP: the Check runs once per request, and in Python its transport dominated it. Under Envoy at
full load, a grpc.aio server that allows everything costs many times the CPU per call of this
server, an ``asyncio`` protocol around ``httptools`` (the parser uvicorn uses) on uvloop; Envoy's
own cost is the same for both (the figures: docs/benchmarks.md).

What Envoy sends (envoy_config.py, ``http_service``): the client's method, ``/check`` + the
client's path, the headers it is told to pass (authorization, x-request-id, content-type) and
the buffered body. What it reads back:

- **200** admits the request. ``x-billingproxy-*`` headers become dynamic metadata for the
  access log (``dynamic_metadata_from_headers``). It carries no credential: Envoy's upstream
  allow-list (upstream_headers.lua) removes the client's key under any name, and the backend
  route sets the backend's (envoy_config.py), so the secret never crosses this port.
- **Any other status** is the denial the client sees: that status, this body, and the headers
  Envoy is told to pass (content-type, retry-after).

The server is HTTP/1.1 with keep-alive, for Envoy's connection pool only (it listens where the
gRPC port does: loopback, or the pod's network). Requests on one connection are answered in
order. Anything malformed is answered 400 (413, 431 when too large) and the connection closed.
"""

from __future__ import annotations

import asyncio
import collections
from http import HTTPStatus

import httptools

from authz_sidecar import api_errors, check, contract

# Envoy sends at most Settings.request_body_bytes_max, and at most 60 KiB of headers (its
# default max_request_headers_kb); anything beyond that is not Envoy.
BODY_SLACK_BYTES = 64 * 1024
HEAD_BYTES_MAX = 96 * 1024
# Envoy never pipelines; a client that does is read no further while this many wait.
PIPELINE_MAX = 8


class CheckServer:
    """The listening socket; one :class:`CheckConnection` per connection from Envoy."""

    def __init__(self, decider: check.Decider, *, body_bytes_max: int) -> None:
        self._decider = decider
        self._body_max = body_bytes_max + BODY_SLACK_BYTES
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[CheckConnection] = set()

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: CheckConnection(self), host, port)

    @property
    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def stop(self) -> None:
        """Stop accepting, let the Checks in progress answer, then close every connection."""
        if self._server is None:
            return
        self._server.close()
        for connection in list(self._connections):
            await connection.finish()
        await self._server.wait_closed()

    async def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        """The whole HTTP response to one Check."""
        outcome = await self._decider.decide(method=method, path=path, headers=headers, body=body)
        return _denial(outcome) if isinstance(outcome, api_errors.ApiError) else self._admission(outcome)

    def _admission(self, metadata: dict[str, str]) -> bytes:
        """200 with the metadata headers. No credential: the backend route sets it (envoy_config.py)."""
        lines = "".join(f"{name}: {value}\r\n" for name, value in metadata.items())
        return b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n" + lines.encode() + b"\r\n"


def _denial(error: api_errors.ApiError) -> bytes:
    body = error.body()
    extra = "".join(f"{name}: {value}\r\n" for name, value in error.headers.items())
    head = (
        f"HTTP/1.1 {error.status} {_reason(error.status)}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class CheckConnection(asyncio.Protocol):
    """One connection from Envoy: httptools parses, each complete request is answered in turn."""

    def __init__(self, server: CheckServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = bytearray()
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_size = 0
        self._refused = False
        # Complete requests (method, path, headers, body, keep-alive), or a refusal's bytes.
        self._queue: collections.deque[tuple[str, str, dict[str, str], bytes, bool] | bytes] = (
            collections.deque()
        )
        self._worker: asyncio.Task[None] | None = None

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        self._server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "upgrade_refused", "This endpoint does not upgrade connections.")
        except httptools.HttpParserError:
            # A callback below stopped the parser, or the bytes are not HTTP.
            if self._body_size > self._server._body_max:
                self._refuse(413, "request_too_large", "Request body too large.")
            elif self._head_size > HEAD_BYTES_MAX:
                self._refuse(431, "headers_too_large", "Request headers too large.")
            else:
                self._refuse(400, "malformed_request", "The request is not valid HTTP/1.1.")

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        # Envoy hung up (its Check timed out): stop the decision. A hold whose batch has not
        # begun is then never placed (group_commit.py).
        if self._worker is not None:
            self._worker.cancel()

    # -- httptools callbacks --

    def on_url(self, url: bytes) -> None:
        self._count_head(url)
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(name, value)
        # Envoy sends each header once; a repeated one keeps its last value.
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def _count_head(self, *parts: bytes) -> None:
        self._head_size += sum(len(part) for part in parts)
        if self._head_size > HEAD_BYTES_MAX:
            raise OverflowError("head too large")  # httptools stops and raises HttpParserCallbackError

    def on_body(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._body_size > self._server._body_max:
            raise OverflowError("body too large")  # httptools stops and raises HttpParserCallbackError
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode("ascii")
        path = self._url.decode("latin-1")
        prefix = contract.CHECK_PATH_PREFIX
        path = path[len(prefix) :] if path.startswith(prefix + "/") else path
        self._queue.append(
            (method, path, self._headers, b"".join(self._body), self._parser.should_keep_alive())
        )
        self._url, self._headers, self._body, self._body_size, self._head_size = bytearray(), {}, [], 0, 0
        if len(self._queue) >= PIPELINE_MAX and self._transport is not None:
            self._transport.pause_reading()
        self._answer_soon()

    # -- answering --

    async def _answer_in_order(self) -> None:
        assert self._transport is not None
        try:
            while self._queue:
                item = self._queue.popleft()
                if isinstance(item, bytes):  # a refusal: the last answer on this connection
                    self._transport.write(item)
                    self._transport.close()
                    return
                method, path, headers, body, keep_alive = item
                if len(self._queue) < PIPELINE_MAX and not self._refused and not self._transport.is_closing():
                    self._transport.resume_reading()  # a no-op unless reading was paused
                response = await self._server.answer(method, path, headers, body)
                if self._transport.is_closing():
                    return
                self._transport.write(response)
                if not keep_alive:
                    self._transport.close()
                    return
        finally:
            self._worker = None

    def _answer_soon(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._answer_in_order(), name="check")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer the unreadable request after those before it, then close the connection."""
        assert self._transport is not None
        self._refused = True
        self._transport.pause_reading()
        self._queue.append(_denial(api_errors.ApiError(status, code, message)))
        self._answer_soon()

    async def finish(self) -> None:
        """Answer what was received, then close (shutdown)."""
        worker = self._worker
        if worker is not None:
            await asyncio.gather(worker, return_exceptions=True)
        if self._transport is not None:
            self._transport.close()
