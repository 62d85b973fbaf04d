"""The Kubernetes emulator keeps the API's promises the operator (and kopf) rely on."""

from __future__ import annotations

import json


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

