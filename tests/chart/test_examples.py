"""The examples of examples/ are what they claim: the CloudNativePG values hand the chart the Secret
the Cluster manifest makes CloudNativePG create. (The chart's checks of test_render.py — helm
lint, Kubernetes' schemas, the CRDs, checkov — run on the example values too: support.chart's
RENDERINGS.)"""

from __future__ import annotations

from typing import Any

import yaml
from support import chart

CLOUDNATIVEPG = chart.ROOT / "examples" / "cloudnativepg"


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
