"""operator/deploy/rbac.yaml is least privilege: it allows every call the operator makes through a
whole lifecycle (create, update, rotate, delete of both kinds), and nothing it never makes."""

from __future__ import annotations

from typing import Any

import yaml
from support import crd_schema

import operator_harness as h

RBAC = crd_schema.ROOT / "operator" / "deploy" / "rbac.yaml"
# Allowed but not exercised against kmock, each for a reason written in rbac.yaml.
NOT_EXERCISED = {
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),  # only with -n 'pattern*'
    ("billingproxy.io", "apikeys/finalizers", "update"),  # owner references, checked by an admission plugin
    *{("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "patch")},  # peering
}


def _granted() -> set[tuple[str, str, str]]:
    granted = set()
    for doc in yaml.safe_load_all(RBAC.read_text()):
        if doc["kind"] != "ClusterRole":
            continue
        for rule in doc["rules"]:
            granted |= {
                (g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
            }
    return granted


def _made_by_operator(request: Any) -> bool:
    agent = request.headers.get("User-Agent", "")
    return agent.startswith("kopf/") or agent.startswith("OpenAPI-Generator/")


async def test_rbac_allows_exactly_what_the_operator_does(operator, kube, emulator) -> None:
    await kube.create("Wallet", "team-a", {"ownerEmail": "alice@example.com"})
    await kube.wait_for("wallets", "team-a", h.is_ready)
    await kube.create("ApiKey", "ci", {"walletRef": {"name": "team-a"}, "secretName": "ci-key"})
    await kube.wait_for("apikeys", "ci", h.is_ready)
    await kube.patch_spec("apikeys", "ci", {"rotationGeneration": 1})
    await kube.wait_for(
        "apikeys", "ci", lambda o: h.is_ready(o) and o["status"].get("rotationGeneration") == 1
    )
    await kube.delete("apikeys", "ci")
    await kube.wait_gone("apikeys", "ci")
    await kube.delete("wallets", "team-a")
    await kube.wait_gone("wallets", "team-a")

    used = set()
    for request in emulator:
        if not _made_by_operator(request) or request.resource is None or not request.resource.plural:
            continue  # discovery (/api, /apis/…) is open to every authenticated client
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        used.add((request.resource.group, resource, h.RBAC_VERBS[request.action.name]))
    granted = _granted()
    assert used - granted == set(), "the operator needs permissions rbac.yaml does not grant"
    assert granted - used - NOT_EXERCISED == set(), "rbac.yaml grants permissions the operator never uses"
    assert ("", "secrets", "list") not in granted and ("", "secrets", "watch") not in granted
