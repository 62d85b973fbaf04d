"""The examples of examples/ are what they claim: the CloudNativePG values hand the chart the Secret
the Cluster manifest makes CloudNativePG create; the GitOps Applications and HelmRelease install
this chart with values it has, and the wallets kept in git are valid resources. (The chart's
checks of test_render.py — helm lint, Kubernetes' schemas, the CRDs, checkov — run on the example
values too: support.chart's RENDERINGS.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from support import chart, crd_schema

CLOUDNATIVEPG = chart.ROOT / "examples" / "cloudnativepg"
GITOPS = chart.ROOT / "examples" / "gitops"


def _database_refs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every DATABASE_URL reference of every rendered container."""
    refs = []
    for doc in docs:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        spec = doc["spec"]["template"]["spec"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            refs += [
                item["valueFrom"]["secretKeyRef"]
                for item in container.get("env", [])
                if item["name"] == "DATABASE_URL"
            ]
    return refs


def test_the_cloudnativepg_values_use_the_app_secret_of_the_cluster() -> None:
    cluster = yaml.safe_load((CLOUDNATIVEPG / "cluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("postgresql.cnpg.io/v1", "Cluster")
    initdb = cluster["spec"]["bootstrap"]["initdb"]
    assert initdb["database"] and initdb["owner"], "the -app Secret's database and role"
    assert cluster["spec"]["instances"] >= 2

    values = yaml.safe_load(chart.EXAMPLE_VALUES["cloudnativepg"].read_text())
    secret = f"{cluster['metadata']['name']}-app"
    assert values["database"] == {"existingSecret": secret, "existingSecretKey": "uri"}

    docs = chart.render("cloudnativepg")
    # The gateway (sidecar), the operator and the migration hook all read CloudNativePG's Secret.
    refs = _database_refs(docs)
    assert len(refs) == 3
    assert all(ref == {"name": secret, "key": "uri"} for ref in refs)
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-database")]


def _gitops(folder: str) -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted((GITOPS / folder).glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def test_the_wallets_kept_in_git_are_valid_against_the_crds() -> None:
    docs = _gitops("wallets")
    assert {doc["kind"] for doc in docs} == {"Wallet", "ApiKey"}
    for doc in docs:
        crd_schema.assert_valid(doc)
    wallets = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "Wallet"}
    for key in (doc for doc in docs if doc["kind"] == "ApiKey"):
        assert key["spec"]["walletRef"]["name"] in wallets, key["metadata"]["name"]


def _renders(values: dict[str, Any], tmp_path: Path) -> None:
    """helm template with ``values`` alone (as the GitOps tool passes them over the defaults):
    values.schema.json refuses any value the chart does not have."""
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    done = chart.helm("template", "billingproxy", str(chart.CHART), "-f", str(values_file))
    assert done.returncode == 0, done.stderr


def test_the_argo_cd_applications_point_at_the_chart_and_the_wallets(tmp_path: Path) -> None:
    apps = {doc["metadata"]["name"]: doc["spec"] for doc in _gitops("argocd")}
    assert all(doc["kind"] == "Application" for doc in _gitops("argocd"))
    release = apps.pop("billingproxy")
    assert (chart.ROOT / release["source"]["path"]).resolve() == chart.CHART
    _renders(release["source"]["helm"]["valuesObject"], tmp_path)
    [wallets] = apps.values()
    assert (chart.ROOT / wallets["source"]["path"]).resolve() == GITOPS / "wallets"
    assert wallets["source"]["repoURL"] == release["source"]["repoURL"]


def test_the_flux_helm_release_points_at_the_chart_of_its_source(tmp_path: Path) -> None:
    docs = {doc["kind"]: doc for doc in _gitops("flux")}
    source, release, wallets = docs["GitRepository"], docs["HelmRelease"], docs["Kustomization"]
    spec = release["spec"]["chart"]["spec"]
    assert (chart.ROOT / spec["chart"]).resolve() == chart.CHART
    for ref in (spec["sourceRef"], wallets["spec"]["sourceRef"]):
        assert ref["kind"] == source["kind"] and ref["name"] == source["metadata"]["name"]
        assert ref.get("namespace", wallets["metadata"]["namespace"]) == source["metadata"]["namespace"]
    _renders(release["spec"]["values"], tmp_path)
    assert (chart.ROOT / wallets["spec"]["path"]).resolve() == GITOPS / "wallets"
