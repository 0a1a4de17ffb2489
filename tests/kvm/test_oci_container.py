"""OCI images as containers: layers as overlayfs lowers shared between images, the image's
config applied, the same files as the image says (sha256sum of a file list)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmctl.oci.samples import CHECK_SCRIPT, expected_check_output, write_samples
from vmctl.oci.store import ImageStore

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="containers need root"),
    pytest.mark.skipif(not (shutil.which("crun") or shutil.which("runc")), reason="no OCI runtime (crun or runc)"),
    pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="busybox-static is not installed"),
]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "VMCTL_CACHE_DIR": str(tmp_path / "cache"), "VMCTL_STATE_DIR": str(tmp_path / "state")}


def vmctl(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "vmctl", *args], env=env, capture_output=True, text=True, timeout=120)
    if check and result.returncode:
        raise AssertionError(f"vmctl {' '.join(args)}: exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def test_oci_images_run_as_containers_on_shared_layers(tmp_path: Path, env: dict[str, str]) -> None:
    a, b = write_samples(tmp_path)
    vmctl(env, "image", "import", str(a))
    vmctl(env, "image", "import", str(b))
    store = ImageStore(tmp_path / "cache" / "oci")
    base_a, base_b = store.get("sample-a").diff_ids[0], store.get("sample-b").diff_ids[0]
    assert base_a == base_b  # one directory for the shared base layer
    assert os.stat(store.layer_dir(base_a) / "bin/busybox").st_nlink == 1

    checked = vmctl(env, "run", "--backend", "container", "--image", "oci:sample-a", "--", "sh", "-c", CHECK_SCRIPT)
    assert checked.stdout == expected_check_output()

    # the image's Cmd, Env, WorkingDir (sample-a) and User (sample-b) apply when the YAML says nothing
    default = vmctl(env, "run", "--backend", "container", "--image", "oci:sample-a")
    assert "ID=vmctl-sample" in default.stdout
    shown = vmctl(env, "run", "--backend", "container", "--image", "oci:sample-b", "--", "sh", "-c", "id -u; pwd; cat /opt/b-only")
    assert shown.stdout.split("\n")[:3] == ["1000", "/", "image b"]
    spec = tmp_path / "box.yaml"
    spec.write_text("machines:\n  box:\n    backend: container\n    image: oci:sample-a\n"
                    "    environment: {SAMPLE: yaml}\n    command: echo $SAMPLE; pwd\n")
    overridden = vmctl(env, "run", str(spec))
    assert overridden.stdout.split("\n")[:2] == ["yaml", "/app"]

    # while a machine uses the layers, `image rm` keeps them
    vmctl(env, "up", str(spec.with_name("idle.yaml")), check=False)  # (no such file: no machine)
    spec.write_text("machines:\n  idle:\n    backend: container\n    image: oci:sample-a\n    command: sleep 600\n")
    vmctl(env, "up", str(spec))
    try:
        vmctl(env, "image", "rm", "sample-a")
        assert store.layer_dir(store.get("sample-b").diff_ids[0]).is_dir()
        top_a = [p for p in (tmp_path / "cache/oci/layers").iterdir() if p.is_dir() and p.name != base_a.split(":")[1]]
        assert len(top_a) == 2  # sample-a's top layer (kept: `idle` uses it) and sample-b's
        assert vmctl(env, "exec", "idle", "--", "cat", "/srv/new.txt").stdout == "new\n"
    finally:
        vmctl(env, "rm", "idle")
    mounts = Path("/proc/mounts").read_text()
    assert str(tmp_path) not in mounts
