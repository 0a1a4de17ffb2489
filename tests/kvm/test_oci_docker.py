"""Round trip with a real Docker Engine (Debian's docker.io, a dockerd of the test's own):
an image Docker built and wrote with `docker save` imports and runs as a vmctl container
with the same files as `docker run` shows; `vmctl image export` gives an archive that
`docker load` accepts and `docker run` runs with the same files again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmctl.oci.samples import base_layer

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="dockerd and containers need root"),
    pytest.mark.skipif(not (shutil.which("dockerd") and shutil.which("docker")), reason="docker.io is not installed"),
    pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="busybox-static is not installed"),
]

DOCKERFILE = """FROM vmctl-oci-base
RUN rm /etc/old.conf && rm -r /srv/sub && echo new > /srv/new.txt && mkdir -p /app && echo app > /app/x && ln /app/x /app/y
ENV GREETING=from-docker
WORKDIR /app
CMD ["/bin/sh", "-c", "echo $GREETING; pwd; cat /etc/os-release"]
"""
LISTING = ("cd / && sha256sum bin/busybox etc/os-release etc/passwd srv/a.txt srv/new.txt app/x app/y shared.bin; "
           "ls -1a /srv /app; stat -c '%n %a %u %g %h' app/x srv; test -e etc/old.conf && echo PRESENT; true")


@pytest.fixture
def docker(tmp_path: Path):
    import tempfile

    from vmctl.suite.columns.base import ColumnUnavailable
    from vmctl.suite.columns.docker import Dockerd

    short = Path(tempfile.mkdtemp(prefix="vmoci-", dir="/tmp"))  # containerd's socket path must be short
    daemon = Dockerd(short)
    try:
        host = daemon.start()
    except ColumnUnavailable as error:
        shutil.rmtree(short, ignore_errors=True)
        pytest.skip(str(error))
    try:
        yield lambda *args, **kw: subprocess.run(["docker", "-H", host, *args], capture_output=True, text=True,
                                                 timeout=300, check=True, **kw)
    finally:
        daemon.stop()
        shutil.rmtree(short, ignore_errors=True)


def keep_for_the_vm_test(saved: Path, listing: str) -> None:
    """The linux tier cannot run Docker inside the nested host cheaply: it boots this saved
    image as a VM from the cache (visible there) and compares with what `docker run` showed."""
    from vmctl.paths import cache_dir

    folder = cache_dir() / "test-artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(saved, folder / ".docker-rt.tar.tmp")
    (folder / "docker-rt.listing").write_text(json.dumps({"script": LISTING, "docker_run": listing}))
    os.replace(folder / ".docker-rt.tar.tmp", folder / "docker-rt.tar")


def test_docker_save_import_run_export_load(tmp_path: Path, docker) -> None:
    env = {**os.environ, "VMCTL_CACHE_DIR": str(tmp_path / "cache"), "VMCTL_STATE_DIR": str(tmp_path / "state"),
           "DOCKER_BUILDKIT": "0"}

    def vmctl(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "vmctl", *args], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"vmctl {' '.join(args)}: {done.stderr}"
        return done

    (tmp_path / "base.tar").write_bytes(base_layer().tar())
    docker("import", str(tmp_path / "base.tar"), "vmctl-oci-base")
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(DOCKERFILE)
    docker("build", "--network", "none", "-t", "vmctl-oci-rt", str(context), env={**os.environ, "DOCKER_BUILDKIT": "0"})
    docker("save", "-o", str(tmp_path / "rt.tar"), "vmctl-oci-rt")

    vmctl("image", "import", str(tmp_path / "rt.tar"))
    from_docker = docker("run", "--rm", "--network", "none", "vmctl-oci-rt", "/bin/sh", "-c", LISTING).stdout
    assert "PRESENT" not in from_docker and "new.txt" in from_docker
    keep_for_the_vm_test(tmp_path / "rt.tar", from_docker)
    as_container = vmctl("run", "--backend", "container", "--image", "oci:rt", "--", "/bin/sh", "-c", LISTING).stdout
    assert as_container == from_docker
    default = vmctl("run", "--backend", "container", "--image", "oci:rt").stdout
    assert default.split("\n")[:2] == ["from-docker", "/app"]

    vmctl("image", "export", "rt", str(tmp_path / "out.tar"))
    loaded = docker("load", "-i", str(tmp_path / "out.tar")).stdout
    assert "rt:latest" in loaded
    again = docker("run", "--rm", "--network", "none", "rt:latest", "/bin/sh", "-c", LISTING).stdout
    assert again == from_docker
    assert docker("run", "--rm", "--network", "none", "rt:latest").stdout == default
