"""tests/support/kubelet.py, the stand-in kubelet of the chart tests: which paths it moves into the
pod's folder. A wrong move makes the rendered-pod tests fail for reasons of the machine they run on
(a checkout under /tmp, where the pod mounts an emptyDir), not of the chart."""

from __future__ import annotations

from pathlib import Path

from support import kubelet

CONTAINER = {
    "name": "sidecar",
    "image": "registry.example/billingproxy:1",
    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    "env": [{"name": "BILLINGPROXY_DATA_DIR", "value": "/tmp/data"}],
}


def pod(folder: Path, path: str) -> kubelet.Pod:
    # As dockerfile_image builds it: the Dockerfile's ENV, with PATH this machine's.
    image = kubelet.Image(env={"PATH": path, "BILLINGPROXY_DATA_DIR": "/tmp/data"})
    spec = {"containers": [CONTAINER], "volumes": [{"name": "tmp", "emptyDir": {}}]}
    return kubelet.Pod(spec, [], folder, {"billingproxy": image})


def test_the_images_own_path_is_this_machines_and_stays(tmp_path: Path) -> None:
    env = pod(tmp_path, "/tmp/checkout/.venv/bin:/usr/bin").env(CONTAINER)
    assert env["PATH"] == "/tmp/checkout/.venv/bin:/usr/bin"


def test_the_containers_paths_move_into_the_pods_folder_even_as_the_image_sets_them(tmp_path: Path) -> None:
    env = pod(tmp_path, "/usr/bin").env(CONTAINER)
    assert env["BILLINGPROXY_DATA_DIR"] == str(tmp_path / "tmp" / "data")
