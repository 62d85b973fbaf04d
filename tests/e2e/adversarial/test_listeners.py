"""Issue 10, findings 1 and 11: who can reach what.

With ``BILLINGPROXY_BIND_HOST=0.0.0.0`` (what a pod needs for its public port) every listener
of the sidecar — the Check, gRPC (the access log), the HTTP API (signup!) and the admin port —
listened on every interface, and Envoy's own admin answered any local user on a TCP port. Now
only Envoy's public listener follows the bind host; the sidecar's listeners are on loopback
(the pod's own network namespace), reached by Envoy alone, and Envoy's admin is a Unix socket
only its owner may open. Files holding secrets (the rendered Envoy config, the database URL) are
private to their owner. And the HTTP API's database engine checks a pooled connection before
using it, so the first call after a database restart does not fail.
"""

from __future__ import annotations

import ipaddress
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

LISTEN = "0A"  # the TCP state of a listening socket in /proc/net/tcp


def tcp_listeners() -> list[tuple[str, int, str]]:
    """Every listening TCP socket as (address, port, inode), from the kernel's own tables."""
    found = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != LISTEN:
                continue
            address, port_hex = fields[1].split(":")
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word in host (little-endian) order.
            packed = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
            ip = ipaddress.ip_address(packed)
            # An IPv6 socket bound to 127.0.0.1 (gRPC's) lists it as ::ffff:127.0.0.1.
            mapped = getattr(ip, "ipv4_mapped", None)
            found.append((str(mapped or ip), int(port_hex, 16), fields[9]))
    return found


def listening_addresses(port: int) -> set[str]:
    """The local addresses listening on ``port`` (IPv4 and IPv6)."""
    return {address for address, bound, _ in tcp_listeners() if bound == port}


def tcp_ports_listened_on_by(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on: its socket descriptors matched to the tables."""
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            sockets.add(target[len("socket:[") : -1])
    return {port for _, port, inode in tcp_listeners() if inode in sockets}


def non_loopback_address() -> str | None:
    """An address of this machine on a real interface, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.123", 9))  # no packet is sent: this only picks a route
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if ipaddress.ip_address(address).is_loopback else address


@pytest.fixture(scope="module")
async def stack(launch_stack) -> AsyncIterator[Any]:
    async with launch_stack(BILLINGPROXY_BIND_HOST="0.0.0.0") as running:
        yield running


async def test_only_envoys_public_listener_follows_the_bind_host(stack) -> None:
    s = stack.settings
    assert listening_addresses(s.gateway_port) == {"0.0.0.0"}
    internal = {"check": s.check_port, "grpc": s.grpc_port, "http api": s.api_port, "admin": s.admin_port}
    for name, port in internal.items():
        assert listening_addresses(port) == {"127.0.0.1"}, name

    outside = non_loopback_address()
    if outside is not None:  # and from another interface, nothing answers
        for port in internal.values():
            with socket.socket() as client, pytest.raises(ConnectionRefusedError):
                client.settimeout(5)
                client.connect((outside, port))
    # The public API still works, through Envoy.
    user = await stack.signup()
    await stack.db.settled(user["wallet_id"])


async def test_envoys_admin_is_a_socket_only_its_owner_may_open(stack) -> None:
    envoy = stack.stack.envoy
    admin = Path(envoy.admin_socket)
    info = admin.stat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert "LIVE" in await envoy.admin_get("/ready")
    # No TCP port answers as Envoy's admin: the gateway's is the only one Envoy listens on.
    assert tcp_ports_listened_on_by(stack.stack.process_ids()["envoy"]) == {stack.settings.gateway_port}


async def test_files_that_hold_secrets_are_private(stack) -> None:
    """The rendered Envoy config carries the access-log secret, the run dir's database URL its
    password: both are readable by their owner only."""
    envoy = stack.stack.envoy
    config = Path(envoy.config_path)
    assert stack.settings.access_log_secret in config.read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert len(stack.settings.access_log_secret) >= 32


async def test_the_http_api_answers_at_once_after_its_database_connections_were_cut(stack) -> None:
    """A database restart (here: every server process of the stack's database terminated) left
    the HTTP API's pooled connections dead, and the first call answered 503. Pre-ping replaces them."""
    async with stack.http.post(
        stack.gateway + "/user/signup", json={"email": "warm-up@example.com"}
    ) as response:
        assert response.status == 201, await response.text()
    async with stack.http.get(stack.admin + "/readyz") as response:
        assert response.status == 200

    async with stack.db.engine.connect() as conn:
        await conn.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    await stack.db.engine.dispose()  # the test's own pool was cut too

    async with stack.http.get(stack.admin + "/readyz") as response:
        assert response.status == 200, await response.text()
    async with stack.http.post(
        stack.gateway + "/user/signup", json={"email": "after-cut@example.com"}
    ) as response:
        assert response.status == 201, await response.text()
