"""Just enough of the Chrome DevTools Protocol to drive headless Chromium from a test: open a
page, read it, type, and click with real mouse events. aiohttp's websocket client only — no
Playwright or Selenium to install.

Chromium runs as root here, hence ``--no-sandbox``; every run gets a fresh profile folder, and
``--remote-debugging-port=0`` lets Chromium pick a free port, which it writes to
``<profile>/DevToolsActivePort``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 30.0


class CdpError(RuntimeError):
    pass


class Page:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read(), name="cdp-reader")

    async def _read(self) -> None:
        async for message in self._ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            future = self._pending.pop(data.get("id", -1), None)
            if future is None or future.done():
                continue  # an event: the tests poll the page instead of subscribing
            if "error" in data:
                future.set_exception(CdpError(f"{data['error']}"))
            else:
                future.set_result(data.get("result", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CdpError("the DevTools connection closed"))

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        return await asyncio.wait_for(future, CALL_TIMEOUT_S)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise CdpError(f"{expression!r} threw: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)

    async def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        """Poll a JavaScript expression until it is truthy (navigations in between are fine)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = await self.evaluate(expression)
            except CdpError as exc:  # the page was between documents
                last = exc
            if last and not isinstance(last, Exception):
                return last
            if time.monotonic() >= deadline:
                url = await self.evaluate("location.href")
                raise AssertionError(f"{what}: not within {timeout} s (last: {last!r}, at {url})")
            await asyncio.sleep(0.05)

    async def click(self, selector: str) -> None:
        """A real left click (mouse moved, pressed, released) in the middle of the element."""
        point = await self.evaluate(
            f"""(() => {{
                const e = document.querySelector({json.dumps(selector)});
                if (!e) return null;
                e.scrollIntoView({{block: "center"}});
                const r = e.getBoundingClientRect();
                return [r.left + r.width / 2, r.top + r.height / 2];
            }})()"""
        )
        if point is None:
            raise AssertionError(f"no element {selector} on {await self.evaluate('location.href')}")
        x, y = point
        await self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        await self.send(
            "Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left", clickCount=1
        )
        await self.send(
            "Input.dispatchMouseEvent", type="mouseReleased", x=x, y=y, button="left", clickCount=1
        )

    async def type_into(self, selector: str, text: str) -> None:
        """Click the field, select what is in it, and type over it."""
        await self.click(selector)
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).select()")
        await self.send("Input.insertText", text=text)

    async def text(self) -> str:
        return await self.evaluate("document.body ? document.body.innerText : ''")

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, CdpError):
            await self._reader


class Chromium:
    """``async with Chromium(path, folder) as browser: page = await browser.new_page()``."""

    def __init__(self, executable: str, folder: Path) -> None:
        self._executable = executable
        self._profile = folder / "profile"
        self._log_path = folder / "chromium.log"
        self._process: subprocess.Popen | None = None
        self._http: aiohttp.ClientSession | None = None
        self._pages: list[Page] = []
        self.port = 0

    async def __aenter__(self) -> Chromium:
        self._profile.mkdir(parents=True)
        with open(self._log_path, "wb") as log:
            self._process = subprocess.Popen(
                [self._executable, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        port_file = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self._process.poll() is not None or time.monotonic() > deadline:
                await self.__aexit__(None, None, None)
                raise AssertionError(
                    f"Chromium did not start; see {self._log_path}:\n{self._log_path.read_text()[-3000:]}"
                )
            await asyncio.sleep(0.05)
        self.port = int(port_file.read_text().split()[0])
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S))
        return self

    async def new_page(self) -> Page:
        assert self._http is not None
        async with self._http.put(f"http://127.0.0.1:{self.port}/json/new?about:blank") as response:
            target = await response.json(content_type=None)
        ws = await self._http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 * 1024 * 1024)
        page = Page(ws)
        self._pages.append(page)
        await page.send("Page.enable")
        return page

    async def __aexit__(self, *_exc: object) -> None:
        for page in self._pages:
            await page.close()
        if self._http is not None:
            await self._http.close()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                await asyncio.to_thread(self._process.wait, 10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                await asyncio.to_thread(self._process.wait)
