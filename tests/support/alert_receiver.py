"""A webhook receiver for alert tests: a real aiohttp server on loopback that records every POST
it gets and answers as told (fail the first N, redirect), as a customer's endpoint would; the
``receiver`` fixture and ``auth``, the header a key is sent in."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web


@dataclasses.dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(self.body)
        return event


class Receiver:
    def __init__(self) -> None:
        self.received: list[Received] = []
        self.fail_first = 0  # answer 500 to this many POSTs before answering 200
        self.url = ""

    def events(self, path: str = "/hook") -> list[dict[str, Any]]:
        return [r.event for r in self.received if r.path == path]

    async def _hook(self, request: web.Request) -> web.Response:
        self.received.append(Received(request.path, dict(request.headers), await request.read()))
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=500, text="not yet")
        return web.Response(status=204)

    async def _redirect(self, request: web.Request) -> web.Response:
        self.received.append(Received(request.path, dict(request.headers), await request.read()))
        raise web.HTTPTemporaryRedirect(self.url + "/redirected")


@contextlib.asynccontextmanager
async def running_receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver._hook)
    app.router.add_post("/redirect", receiver._redirect)
    app.router.add_post("/redirected", receiver._hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    receiver.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield receiver
    finally:
        await runner.cleanup()


@pytest.fixture(name="receiver")
async def receiver_fixture() -> AsyncIterator[Receiver]:
    """A running receiver, per test (tests/e2e/conftest.py offers it to the e2e tests)."""
    async with running_receiver() as running:
        yield running


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}
