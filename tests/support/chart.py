"""Render the Helm chart with the real helm binary (`make helm` puts it in .venv/bin)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "billingproxy"
VALUES = ROOT / "tests" / "chart" / "values"
HELM = Path(sys.executable).with_name("helm")
RELEASE = "bp"
NAMESPACE = "billingproxy"
#: The renderings every check runs on: the least an install needs, every option on, every
#: secret from an existing Secret.
RENDERINGS = ("required", "full", "existing-secrets")


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not HELM.is_file():
        raise RuntimeError(f"{HELM} is missing: run `make helm`")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120, check=False)


def values_args(name: str) -> list[str]:
    files = [VALUES / "required.yaml"] if name != "required" else []
    files.append(VALUES / f"{name}.yaml")
    return [arg for path in files for arg in ("-f", str(path))]


def render_text(name: str) -> str:
    done = helm("template", RELEASE, str(CHART), "-n", NAMESPACE, *values_args(name))
    if done.returncode != 0:
        raise AssertionError(f"helm template ({name}) failed:\n{done.stderr}")
    return done.stdout


def render(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render_text(name)) if doc]


def find(docs: list[dict[str, Any]], kind: str, name_suffix: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    return doc
