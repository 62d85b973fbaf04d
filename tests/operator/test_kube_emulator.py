"""The Kubernetes emulator keeps the API's promises the operator (and kopf) rely on."""

from __future__ import annotations

import asyncio
import json

import operator_harness as h


async def test_a_watch_from_a_listed_version_streams_a_deletion_made_after_the_list(kube) -> None:
    """kopf lists, then watches from the list's version. A DELETE that only marks an object (it
    has finalizers) is a write like any other: the API server gives it a new resourceVersion,
    so the watch streams it. Without one it was never streamed, and kopf never saw the deletion."""
    await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"}, finalizers=["test/keep"])
    listed = await kube._call("GET", kube._path("wallets"))
    await kube.delete("wallets", "team-a")
    await kube.create("Wallet", "later", {"ownerEmail": "bob@example.com"})  # a write after it

    params = {"watch": "true", "resourceVersion": listed["metadata"]["resourceVersion"]}
    async with kube.session.get(kube._path("wallets"), params=params) as response:
        first = json.loads(await response.content.readline())
    marked = first["object"]["metadata"]
    assert (marked["name"], bool(marked.get("deletionTimestamp"))) == ("team-a", True), first
    assert int(marked["resourceVersion"]) > int(listed["metadata"]["resourceVersion"])
    assert marked["generation"] == 2  # as the API server's registry does on marking


async def test_two_writes_guarded_by_the_same_resource_version_cannot_both_succeed(kube, emulator) -> None:
    """Optimistic concurrency (``test /metadata/resourceVersion``, what kopf's condition and
    finalizer patches carry) only works if the check and the write are one step. Writes queued
    behind a busy emulator were checked against the state before the first of them applied: both
    passed, and the second put back what the first had changed (a Wallet lost its Ready)."""
    created = await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"})
    version = created["metadata"]["resourceVersion"]
    arrived: list[object] = []
    emulator.observe(lambda request: arrived.append(request) if request.method == "PATCH" else None)

    async def guarded(condition: str) -> int:
        ops = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": version},
            {"op": "add", "path": "/status", "value": {"conditions": [{"type": condition}]}},
        ]
        try:
            await kube._call(
                "PATCH",
                kube._path("wallets", "team-a", subresource="status"),
                json=ops,
                headers={"Content-Type": "application/json-patch+json"},
            )
        except h.ApiError as exc:
            return exc.status
        return 200

    async with emulator._lock:  # the emulator is busy (kmock holds this lock while it publishes)
        writes = [asyncio.ensure_future(guarded("Ready")), asyncio.ensure_future(guarded("Synced"))]

        async def both_arrived() -> bool:
            return len(arrived) == 2

        await h.eventually(both_arrived, what="both writes at the emulator")
    assert sorted(await asyncio.gather(*writes)) == [200, 422]


async def test_every_write_gives_a_new_resource_version_also_through_the_status(kube) -> None:
    """A status write is a write: without a new version, kopf's guarded patches computed before it
    still passed their ``test`` and overwrote it (the timer's Synced replaced the handler's Ready)."""
    versions = [
        int(
            (await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"}))["metadata"][
                "resourceVersion"
            ]
        )
    ]
    for path, body in (
        ("wallets", {"status": {"state": "Active"}}),
        ("wallets", {"spec": {"suspended": True}}),
    ):
        status = "status" if "status" in body else None
        changed = await kube._call(
            "PATCH",
            kube._path(path, "team-a", subresource=status),
            json=body,
            headers={"Content-Type": "application/merge-patch+json"},
        )
        versions.append(int(changed["metadata"]["resourceVersion"]))
    assert versions == sorted(set(versions)), versions
