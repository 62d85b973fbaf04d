"""Issue 10, finding 10: the signup limits, each a free grant's last line of defence.

- Behind a load balancer every client reached Envoy from the balancer's address, so all of them
  shared one budget. With ``BILLINGPROXY_TRUSTED_PROXY_HOPS=N`` Envoy takes the Nth address from
  the right of X-Forwarded-For (the one the outermost trusted proxy appended) as the client, and
  the sidecar counts against the address Envoy computed; addresses a client prepends itself buy
  nothing.
- Many addresses (a botnet, an IPv6 block) each within its own budget: a gateway-wide limit
  (``BILLINGPROXY_SIGNUP_RATE_GLOBAL_PER_MINUTE``) bounds the grants given per minute whatever
  the addresses, and holds even for a caller that reaches the sidecar's port directly with made-up
  headers.
- ``bob+1@`` and ``b.o.b@`` reach bob's inbox: addresses that normalise to one mailbox get one
  free wallet; the second signup answers 409 ``email_taken`` and writes nothing, concurrently too.

Through the real stack (Envoy, the sidecar, PostgreSQL); each test starts its own, so budgets
never leak between tests.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import pytest

pytestmark = pytest.mark.integration

BALANCER = "127.0.0.3"  # the load balancer's address, as Envoy sees the connection


async def post_signup(
    session: aiohttp.ClientSession, url: str, email: str, **headers: str
) -> tuple[int, Any, str | None]:
    async with session.post(url + "/user/signup", json={"email": email}, headers=headers) as response:
        return response.status, await response.json(), response.headers.get("Retry-After")


def fresh_email() -> str:
    return f"u-{uuid.uuid4().hex[:12]}@example.com"


def assert_rate_limited(status: int, body: Any, retry_after: str | None) -> None:
    assert status == 429, body
    assert body["error"]["code"] == "rate_limited" and body["error"]["type"] == "rate_limit_error", body
    assert retry_after is not None and 1 <= int(retry_after) <= 60


async def test_behind_a_load_balancer_each_client_has_its_own_budget(launch_stack) -> None:
    async with launch_stack(
        BILLINGPROXY_TRUSTED_PROXY_HOPS="1", BILLINGPROXY_SIGNUP_RATE_PER_MINUTE="2"
    ) as stack:
        connector = aiohttp.TCPConnector(local_addr=(BALANCER, 0))
        async with aiohttp.ClientSession(connector=connector) as balancer:

            async def through_balancer(client: str, claimed: str = "") -> tuple[int, Any, str | None]:
                # The balancer appends the address it saw to whatever the client sent.
                forwarded = f"{claimed}, {client}" if claimed else client
                return await post_signup(
                    balancer, stack.gateway, fresh_email(), **{"X-Forwarded-For": forwarded}
                )

            for _ in range(2):
                status, body, _ = await through_balancer("203.0.113.10")
                assert status == 201, body
            assert_rate_limited(*await through_balancer("203.0.113.10"))
            # Addresses the client writes itself are left of the balancer's: they buy nothing.
            counts = await stack.db.row_counts()
            assert_rate_limited(*await through_balancer("203.0.113.10", claimed="198.51.100.7"))
            assert_rate_limited(*await through_balancer("203.0.113.10", claimed="198.51.100.8, 192.0.2.1"))
            assert await stack.db.row_counts() == counts
            # Another client behind the same balancer has a budget of its own.
            for _ in range(2):
                status, body, _ = await through_balancer("203.0.113.20")
                assert status == 201, body


async def test_without_trusted_hops_forwarded_addresses_are_ignored(launch_stack) -> None:
    """The default (0 hops): the client is Envoy's peer; X-Forwarded-For is the client's own word."""
    async with launch_stack(BILLINGPROXY_SIGNUP_RATE_PER_MINUTE="2") as stack:
        connector = aiohttp.TCPConnector(local_addr=(BALANCER, 0))
        async with aiohttp.ClientSession(connector=connector) as client:
            for n in range(2):
                status, body, _ = await post_signup(
                    client, stack.gateway, fresh_email(), **{"X-Forwarded-For": f"203.0.113.{n}"}
                )
                assert status == 201, body
            assert_rate_limited(
                *await post_signup(
                    client,
                    stack.gateway,
                    fresh_email(),
                    **{"X-Forwarded-For": "203.0.113.99", "X-Envoy-External-Address": "203.0.113.98"},
                )
            )
            # Without X-Forwarded-For, from a loopback peer: still external to Envoy (no address is
            # internal in its config), so a client's own x-envoy-external-address is replaced.
            for n in range(3):
                assert_rate_limited(
                    *await post_signup(
                        client, stack.gateway, fresh_email(), **{"X-Envoy-External-Address": f"192.0.2.{n}"}
                    )
                )


async def test_a_gateway_wide_limit_bounds_signups_from_many_addresses(launch_stack) -> None:
    async with launch_stack(
        BILLINGPROXY_TRUSTED_PROXY_HOPS="1",
        BILLINGPROXY_SIGNUP_RATE_PER_MINUTE="100",
        BILLINGPROXY_SIGNUP_RATE_GLOBAL_PER_MINUTE="3",
    ) as stack:
        connector = aiohttp.TCPConnector(local_addr=(BALANCER, 0))
        async with aiohttp.ClientSession(connector=connector) as balancer:
            for n in range(3):
                status, body, _ = await post_signup(
                    balancer, stack.gateway, fresh_email(), **{"X-Forwarded-For": f"203.0.113.{n}"}
                )
                assert status == 201, body
            counts = await stack.db.row_counts()
            # A fourth address, never seen before, is still refused: the gateway's minute is spent.
            assert_rate_limited(
                *await post_signup(
                    balancer, stack.gateway, fresh_email(), **{"X-Forwarded-For": "198.51.100.200"}
                )
            )
            assert await stack.db.row_counts() == counts


async def test_the_gateway_wide_limit_holds_for_a_caller_at_the_sidecars_port(launch_stack) -> None:
    """Reaching the sidecar's HTTP port without Envoy (which a loopback bind prevents from outside
    the pod) lets a caller claim any client address; the gateway-wide limit still holds."""
    async with launch_stack(
        BILLINGPROXY_SIGNUP_RATE_PER_MINUTE="100", BILLINGPROXY_SIGNUP_RATE_GLOBAL_PER_MINUTE="3"
    ) as stack:
        sidecar = f"http://127.0.0.1:{stack.settings.api_port}"
        async with aiohttp.ClientSession() as direct:
            answers = [
                await post_signup(
                    direct,
                    sidecar,
                    fresh_email(),
                    **{"X-Envoy-External-Address": f"198.51.100.{n}", "X-Forwarded-For": f"192.0.2.{n}"},
                )
                for n in range(4)
            ]
        assert [status for status, _, _ in answers] == [201, 201, 201, 429], answers
        assert_rate_limited(*answers[-1])


@pytest.fixture(scope="module")
async def mailbox_stack(launch_stack) -> Any:
    async with launch_stack() as running:
        yield running


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("bob{t}@gmail.com", "b.o.b{t}@gmail.com"),
        ("bob{t}@gmail.com", "bob{t}+1@gmail.com"),
        ("bob{t}@gmail.com", "B.ob{t}+free.credit@GoogleMail.com"),
        ("bob{t}@example.com", "bob{t}+1@example.com"),
        ("bob{t}+1@example.com", "bob{t}+2@example.com"),
        ("bob{t}+1@example.com", "BOB{t}@example.com"),
    ],
)
async def test_addresses_of_one_mailbox_get_one_free_wallet(mailbox_stack, first: str, second: str) -> None:
    stack = mailbox_stack
    tag = uuid.uuid4().hex[:8]  # every case its own mailbox on the shared stack
    status, body, _ = await post_signup(stack.http, stack.gateway, first.format(t=tag))
    assert (status, body["balance_usd"]) == (201, "0.500000"), body
    counts = await stack.db.row_counts()
    status, body, _ = await post_signup(stack.http, stack.gateway, second.format(t=tag))
    assert status == 409, body
    assert body["error"]["code"] == "email_taken" and body["error"]["param"] == "email", body
    assert await stack.db.row_counts() == counts


async def test_other_providers_keep_their_dots(mailbox_stack) -> None:
    """Only providers that ignore dots (Gmail) fold them; elsewhere b.ob and bob are two people."""
    stack = mailbox_stack
    tag = uuid.uuid4().hex[:8]
    for address in (f"bob{tag}@example.com", f"b.ob{tag}@example.com"):
        status, body, _ = await post_signup(stack.http, stack.gateway, address)
        assert status == 201, body


async def test_concurrent_signups_of_one_mailbox_get_one_wallet(mailbox_stack) -> None:
    stack = mailbox_stack
    tag = uuid.uuid4().hex[:8]
    addresses = [f"carol{tag}+{n}@gmail.com" for n in range(6)] + [f"c.a.r.o.l{tag}@gmail.com"]
    addresses += [f"ca.rol{tag}+{n}@googlemail.com" for n in range(5)]
    answers = await asyncio.gather(*(post_signup(stack.http, stack.gateway, a) for a in addresses))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [201] + [409] * (len(addresses) - 1), answers
    [grant] = await stack.db.rows(
        "SELECT l.amount_nano FROM ledger_entries l JOIN wallets w ON w.id = l.wallet_id "
        "WHERE l.kind = 'grant' AND w.email LIKE :pattern",
        pattern=f"%{tag}%",
    )
    assert grant.amount_nano == 500_000_000


async def test_the_exact_policy_keeps_every_address_apart(launch_stack) -> None:
    async with launch_stack(BILLINGPROXY_SIGNUP_EMAIL_POLICY="exact") as stack:
        for address in ("dave@gmail.com", "d.ave@gmail.com", "dave+1@gmail.com"):
            status, body, _ = await post_signup(stack.http, stack.gateway, address)
            assert (status, body["balance_usd"]) == (201, "0.500000"), body
        status, body, _ = await post_signup(stack.http, stack.gateway, "DAVE@gmail.com")
        assert (status, body["error"]["code"]) == (409, "email_taken")
