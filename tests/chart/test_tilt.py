"""The Tiltfile, run without Tilt: it is written in the part of Starlark that is also Python, so it
is executed here with stand-ins for Tilt's functions. Only the stand-ins are fake: `helm` is the
real helm on the chart, and what the Tiltfile would apply is validated against Kubernetes' schemas.

What is proven: every kube context but the kind cluster of kind.yaml is refused before anything is
built or applied; on that one, the chart renders with dev/values-dev.yaml, the dev services and
the Stripe double are added, every resource the Tiltfile configures exists, and live_update syncs
each package to where the image installed it. What is not: Tilt's own behaviour (image matching,
the restart_process extension), which needs a tilt binary and a cluster.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import chart

TILTFILE = chart.ROOT / "Tiltfile"
KIND = yaml.safe_load((chart.ROOT / "kind.yaml").read_text())


class TiltfileFailed(Exception):
    """The Tiltfile called fail()."""


class Tilt:
    """Stand-ins for the Tilt functions the Tiltfile calls, recording what it asked for."""

    def __init__(self, context: str) -> None:
        self.context = context
        self.allowed: list[str] = []
        self.builds: list[dict[str, Any]] = []
        self.objects: list[dict[str, Any]] = []
        self.resources: dict[str, dict[str, Any]] = {}

    def run(self) -> None:
        namespace = {
            "allow_k8s_contexts": self._allow,
            "k8s_context": lambda: self.context,
            "fail": self._fail,
            "load": lambda extension, *names: namespace.update({name: self._build for name in names}),
            "read_file": lambda path: (chart.ROOT / path).read_text(),
            "sync": lambda local, remote: {"local": local, "remote": remote},
            "helm": self._helm,
            "decode_yaml_stream": lambda text: [doc for doc in yaml.safe_load_all(text) if doc],
            "encode_yaml_stream": yaml.safe_dump_all,
            "k8s_yaml": self._k8s_yaml,
            "k8s_resource": lambda name, **kwargs: self.resources.update({name: kwargs}),
        }
        exec(compile(TILTFILE.read_text(), str(TILTFILE), "exec"), namespace)

    def _allow(self, contexts: str | list[str]) -> None:
        self.allowed += [contexts] if isinstance(contexts, str) else contexts

    def _fail(self, message: str) -> None:
        raise TiltfileFailed(message)

    def _build(self, ref: str, context: str, **kwargs: Any) -> None:
        self.builds.append({"ref": ref, "context": context, **kwargs})

    def _helm(self, path: str, name: str, namespace: str, values: list[str]) -> str:
        files = [arg for value in values for arg in ("-f", str(chart.ROOT / value))]
        done = chart.helm("template", name, str(chart.ROOT / path), "-n", namespace, *files)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def _k8s_yaml(self, source: str) -> None:
        text = source if "\n" in source else (chart.ROOT / source).read_text()
        self.objects += [doc for doc in yaml.safe_load_all(text) if doc]

    def workload(self, name: str) -> dict[str, Any]:
        [found] = [
            o for o in self.objects if o["kind"] in ("Deployment", "Job") and o["metadata"]["name"] == name
        ]
        return found


def test_the_allowed_context_is_the_kind_cluster_of_kind_yaml() -> None:
    tilt = Tilt(f"kind-{KIND['name']}")
    tilt.run()
    assert tilt.allowed == [f"kind-{KIND['name']}"]
    assert len(re.findall(r"^allow_k8s_contexts\(", TILTFILE.read_text(), re.MULTILINE)) == 1


@pytest.mark.parametrize(
    "context", ["kind-kind", f"kind-{KIND['name']}-old", "docker-desktop", "gke_prod_europe-west1_main", ""]
)
def test_every_other_context_is_refused_before_anything_is_built(context: str) -> None:
    tilt = Tilt(context)
    with pytest.raises(TiltfileFailed, match="runs only on the kind cluster"):
        tilt.run()
    assert tilt.builds == [] and tilt.objects == []


def _containers(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pod = workload["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*pod.get("initContainers", []), *pod["containers"]]}


def test_on_kind_it_installs_the_chart_with_dev_values_and_the_dev_services(tmp_path: Path) -> None:
    tilt = Tilt(f"kind-{KIND['name']}")
    tilt.run()
    manifest = tmp_path / "tilt.yaml"
    manifest.write_text(yaml.safe_dump_all(tilt.objects))
    chart.assert_valid_kubernetes(manifest)

    workloads = {o["metadata"]["name"] for o in tilt.objects if o["kind"] in ("Deployment", "Job")}
    assert {"postgres", "demo-backend", "billingproxy-gateway", "billingproxy-operator"} <= workloads
    for name, resource in tilt.resources.items():
        assert name in workloads
        assert set(resource.get("resource_deps", [])) <= workloads

    gateway = _containers(tilt.workload("billingproxy-gateway"))
    assert set(gateway) == {"render-envoy-config", "envoy", "sidecar", "stripe-double"}
    sidecar_env = {item["name"]: item for item in gateway["sidecar"]["env"]}
    assert sidecar_env["STRIPE_API_BASE"]["value"] == "http://127.0.0.1:12111"
    assert "--port" in gateway["stripe-double"]["command"]
    assert {item["name"] for item in gateway["stripe-double"]["env"]} == {
        "STRIPE_SECRET_KEY",
        "STRIPE_WEBHOOK_SECRET",
    }
    operator = _containers(tilt.workload("billingproxy-operator"))["operator"]
    assert not [item for item in operator["env"] if item["name"].startswith("STRIPE_")]
    # Only the project image's containers get a writable root (for live_update); Envoy keeps its.
    assert gateway["envoy"]["securityContext"]["readOnlyRootFilesystem"] is True
    assert gateway["sidecar"]["securityContext"]["readOnlyRootFilesystem"] is False


def test_the_image_is_the_dev_stage_and_live_update_syncs_every_package() -> None:
    tilt = Tilt(f"kind-{KIND['name']}")
    tilt.run()
    [build] = tilt.builds
    dockerfile = (chart.ROOT / "Dockerfile").read_text()
    assert re.search(rf"^FROM \S+ AS {build['target']}$", dockerfile, re.MULTILINE)
    makefile = (chart.ROOT / "Makefile").read_text()
    assert f"LITELLM_VERSION := {build['build_args']['LITELLM_VERSION']}\n" in makefile
    python = re.search(r"^ARG PYTHON_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    assert python is not None
    site_packages = f"/opt/billingproxy/lib/python{python.group(1)}/site-packages"
    synced = {s["local"]: s["remote"] for s in build["live_update"]}
    assert synced == {
        "billing": f"{site_packages}/billing",
        "billing_stripe": f"{site_packages}/billing_stripe",
        "authz_sidecar": f"{site_packages}/authz_sidecar",
        "billingproxy": f"{site_packages}/billingproxy",
        "operator/billing_operator": f"{site_packages}/billing_operator",
    }
    for local in synced:
        assert (chart.ROOT / local / "__init__.py").is_file()
