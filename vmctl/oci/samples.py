"""Small OCI images built at test time from the host's static busybox: two images sharing
their base layer, with whiteouts, an opaque directory, hard links (in a layer and to a
lower layer's file), symlinks, modes and owners. The tests run them as containers and as
VMs and compare `sha256sum` of the same file list with what `EXPECTED` says."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .write import Layer, write_layout

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "cat", "ls", "id", "pwd", "env", "sha256sum", "find", "sort", "echo", "test", "stat", "uname",
           "sleep", "true", "wc", "head", "mount")


def base_layer() -> Layer:
    layer = Layer().dir("bin").file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
    for applet in APPLETS:
        layer.symlink(f"bin/{applet}", "busybox")
    return (layer.dir("etc").file("etc/os-release", 'NAME="vmctl sample"\nID=vmctl-sample\nVERSION_ID=1\n')
            .file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
            .file("etc/group", "root:x:0:\napp:x:1000:\n").file("etc/old.conf", "to be deleted\n")
            .dir("root", mode=0o700).dir("tmp", mode=0o1777).dir("proc").dir("sys").dir("dev").dir("run")
            .dir("srv").file("srv/a.txt", "a\n").file("srv/b.txt", "b\n").dir("srv/sub").file("srv/sub/c.txt", "c\n")
            .file("shared.bin", bytes(range(256)) * 64))


def layer_a() -> Layer:
    return (Layer().dir("etc").whiteout("etc/old.conf").dir("srv", mode=0o750).opaque("srv").file("srv/new.txt", "new\n")
            .dir("app").file("app/run.sh", "#!/bin/sh\necho app\n", mode=0o755).hardlink("app/run-link.sh", "app/run.sh")
            .hardlink("app/os-release.copy", "etc/os-release").symlink("app/abs", "/etc/os-release")
            .symlink("app/rel", "../etc/passwd").file("app/owned", "owned\n", uid=1000, gid=1000, mode=0o640)
            .file("app/suid", "suid\n", mode=0o4755))


def layer_b() -> Layer:
    return Layer().dir("opt").file("opt/b-only", "image b\n")


def write_samples(folder: Path) -> tuple[Path, Path]:
    """OCI layouts folder/sample-a and folder/sample-b (same base layer)."""
    a, b = folder / "sample-a", folder / "sample-b"
    write_layout(a, [base_layer().tar(), layer_a().tar()], cmd=["/bin/sh", "-c", "cat /etc/os-release"],
                 env=["PATH=/bin", "SAMPLE=a"], working_dir="/app")
    write_layout(b, [base_layer().tar(), layer_b().tar()], gzip_layers=False, cmd=["/bin/cat", "/opt/b-only"],
                 env=["PATH=/bin"], user="app")
    return a, b


# What the merged root of sample-a shows, for the files the check lists.
EXPECTED_A = {
    "etc/os-release": b'NAME="vmctl sample"\nID=vmctl-sample\nVERSION_ID=1\n',
    "srv/new.txt": b"new\n",
    "app/run.sh": b"#!/bin/sh\necho app\n",
    "app/run-link.sh": b"#!/bin/sh\necho app\n",
    "app/os-release.copy": b'NAME="vmctl sample"\nID=vmctl-sample\nVERSION_ID=1\n',
    "app/abs": b'NAME="vmctl sample"\nID=vmctl-sample\nVERSION_ID=1\n',
    "app/rel": b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
    "app/owned": b"owned\n",
    "shared.bin": bytes(range(256)) * 64,
}
ABSENT_A = ("etc/old.conf", "srv/a.txt", "srv/b.txt", "srv/sub")
STATS_A = ("app/owned", "app/suid", "srv", "app/run.sh")  # mode and owner: `stat -c '%n %a %u %g'`

CHECK_SCRIPT = (
    "cd / && sha256sum " + " ".join(sorted(EXPECTED_A)) + "; "
    + "for p in " + " ".join(ABSENT_A) + "; do test -e $p && echo PRESENT $p; done; "
    + "stat -c '%n %a %u %g' " + " ".join(STATS_A) + "; "
    + "stat -c '%h' app/run.sh"
)


def expected_check_output() -> str:
    lines = [f"{hashlib.sha256(EXPECTED_A[name]).hexdigest()}  {name}" for name in sorted(EXPECTED_A)]
    lines += ["app/owned 640 1000 1000", "app/suid 4755 0 0", "srv 750 0 0", "app/run.sh 755 0 0", "2"]
    return "\n".join(lines) + "\n"
