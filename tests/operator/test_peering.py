"""kopf peering as the Helm chart sets it up, run against the Kubernetes API emulator.

With `operator.namespaces`, kopf given a peering name is paused while the peering resource of its
mode is missing: the namespaced `kopfpeerings`, not the `clusterkopfpeerings` the chart used to
ship. Here the operator reconciles a Wallet with exactly the KopfPeering the chart renders, and
calls on `kopfpeerings` only verbs the chart's Role grants. And the chart's two replicas on one
peering must not pause each other (kopf pauses peers of equal priority)."""

from __future__ import annotations

import dataclasses

import kmock
import kmock._internal.parsing as kmock_parsing
import pytest
from support import chart

import operator_harness as h
from billing_operator import settings as operator_settings

# It renders the chart with helm too.
pytestmark = pytest.mark.chart


@pytest.fixture
def namespace_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    """kopf with namespaces lists and watches `/api/v1/namespaces` to learn which of them exist;
    kmock 0.8 reads that path as a namespace without a name (and answers 500). Here it is what
    the API server makes of it: the collection of the cluster-scoped Namespaces."""
    parse = kmock_parsing.parse_path

    def parse_path(path: str) -> kmock_parsing.ParsedPath:
        if path.strip("/") == "api/v1/namespaces":
            return kmock_parsing.ParsedPath(group="", version="v1", plural="namespaces")
        return parse(path)

    monkeypatch.setattr(kmock_parsing, "parse_path", parse_path)


def _rendered_peering() -> tuple[dict, list[dict], list[dict]]:
    """The chart's KopfPeering CRD, its KopfPeerings and the operator's Roles for them, rendered
    with namespaces ("full" sets operator.namespaces)."""
    docs = chart.render("full")
    [crd] = [d for d in docs if d["kind"] == "CustomResourceDefinition" and d["spec"]["group"] == "kopf.dev"]
    peerings = [d for d in docs if d["apiVersion"] == "kopf.dev/v1"]
    roles = [d for d in docs if d["kind"] == "Role"]
    return crd, peerings, roles


async def test_a_namespaced_operator_runs_with_the_charts_peering_and_its_role(
    namespace_listing, emulator, kube, direct_settings: operator_settings.OperatorSettings, kubeconfig
) -> None:
    crd, peerings, roles = _rendered_peering()
    names = crd["spec"]["names"]
    assert crd["spec"]["scope"] == "Namespaced"
    emulator.resources[f"kopf.dev/v1/{names['plural']}"] = kmock.ResourceInfo(
        kind=names["kind"],
        singular=names["singular"],
        namespaced=True,
        verbs={"get", "list", "watch", "create", "patch", "delete"},
    )
    await kube._call(
        "POST",
        "/api/v1/namespaces",
        json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": kube.namespace}},
    )
    # The chart's KopfPeering of its first namespace, made in the namespace the tests use.
    peering = peerings[0]
    body = {**peering, "metadata": {"name": peering["metadata"]["name"], "namespace": kube.namespace}}
    await kube._call("POST", f"/apis/kopf.dev/v1/namespaces/{kube.namespace}/{names['plural']}", json=body)

    cfg = dataclasses.replace(
        direct_settings, namespaces=(kube.namespace,), peering=peering["metadata"]["name"]
    )
    async with h.running(cfg):
        await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"})
        await kube.wait_for("wallets", "team-a", h.is_ready)

        async def announced() -> bool:
            found = await kube._call(
                "GET",
                f"/apis/kopf.dev/v1/namespaces/{kube.namespace}/{names['plural']}/{body['metadata']['name']}",
            )
            return bool(found.get("status"))

        await h.eventually(announced, what="the operator's keep-alive in the KopfPeering")

    used = {
        h.RBAC_VERBS[request.action.name]
        for request in emulator
        if request.resource is not None
        and request.resource.plural == names["plural"]
        and request.headers.get("User-Agent", "").startswith("kopf/")
    }
    granted = {
        verb
        for role in roles
        for rule in role["rules"]
        if names["plural"] in rule["resources"]
        for verb in rule["verbs"]
    }
    assert used == {"list", "watch", "patch"}
    assert used <= granted


async def test_replicas_of_one_peering_elect_one_active_operator(
    emulator, kube, direct_settings: operator_settings.OperatorSettings, kubeconfig
) -> None:
    """The chart runs two operator replicas on one ClusterKopfPeering (operator.replicas: 2). kopf
    pauses all operators that see a peer of their own priority ("Pausing all operators, including
    self"): with one shared priority, no Wallet would ever become Ready."""
    [crd] = [
        d
        for d in chart.render("required")
        if d["kind"] == "CustomResourceDefinition" and d["spec"]["group"] == "kopf.dev"
    ]
    names = crd["spec"]["names"]
    emulator.resources[f"kopf.dev/v1/{names['plural']}"] = kmock.ResourceInfo(
        kind=names["kind"],
        singular=names["singular"],
        namespaced=False,
        verbs={"get", "list", "watch", "create", "patch", "delete"},
    )
    url = f"/apis/kopf.dev/v1/{names['plural']}"
    await kube._call(
        "POST",
        url,
        json={"apiVersion": "kopf.dev/v1", "kind": names["kind"], "metadata": {"name": "billingproxy"}},
    )
    cfg = dataclasses.replace(direct_settings, peering="billingproxy")
    async with h.running(cfg) as one, h.running(cfg) as two:

        async def both_announced() -> bool:
            found = await kube._call("GET", f"{url}/billingproxy")
            return len(found.get("status") or {}) == 2

        await h.eventually(both_announced, what="both replicas' keep-alives in the peering")
        await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"})
        await kube.wait_for("wallets", "team-a", h.is_ready)
        assert not any(operator.logged("Pausing all operators") for operator in (one, two))
