"""Snapshots of real Linux guests (busybox image, disk + network + agent): memory snapshot,
two clones at once that each answer exec, keep the source's disk and write their own, and
reach the host over their own TAP; stop/start keeps what was written to disk."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmctl.images import locate

VMCTL = str(Path(sys.executable).with_name("vmctl"))


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "state"  # sockets live here: a local file system
    monkeypatch.setenv("VMCTL_STATE_DIR", str(path))
    return path


def vmctl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([VMCTL, *args], capture_output=True, text=True, timeout=timeout)


def sh(name: str, script: str) -> str:
    result = vmctl("exec", name, "--", "sh", "-c", script, timeout=120)
    assert result.returncode == 0, (name, script, result.stderr)
    return result.stdout


def host_ip(name: str) -> str:
    return json.loads(vmctl("status", name).stdout)["network"]["host_ip"]


@pytest.fixture
def source(tmp_path):
    if not locate("busybox").initramfs.exists():
        pytest.skip("the reference images are not built (vmctl image build)")
    spec = tmp_path / "vm.yaml"
    spec.write_text("machines:\n  src:\n    memory: 192M\n    network: isolated\n    disks:\n      - size: 16M\n")
    up = vmctl("up", str(spec))
    assert up.returncode == 0, up.stderr
    yield "src"
    for name in ("src", "c1", "c2"):  # one by one: rm stops at an unknown name
        vmctl("rm", name)


def test_two_clones_answer_exec_keep_the_disk_write_their_own_and_reach_the_host(source):
    sh(source, "echo source-data | dd of=/dev/vda bs=512 count=1 conv=sync 2>/dev/null; sync")
    created = vmctl("snapshot", "create", "--memory", source, "ready")
    assert created.returncode == 0, created.stderr
    for clone in ("c1", "c2"):
        up = vmctl("up", "--from-snapshot", "ready", "--name", clone)
        assert up.returncode == 0, up.stderr
    for clone in ("c1", "c2"):
        assert sh(clone, "hostname").strip() == clone  # told its new identity
        assert sh(clone, "dd if=/dev/vda bs=512 count=1 2>/dev/null | head -n1") == "source-data\n"
        sh(clone, f"echo {clone}-data | dd of=/dev/vda bs=512 seek=1 count=1 conv=sync 2>/dev/null; sync")
        assert sh(clone, f"ping -c 1 -W 5 {host_ip(clone)} >/dev/null && echo reached") == "reached\n"
    for clone in ("c1", "c2"):  # each disk has its own write only
        assert sh(clone, "dd if=/dev/vda bs=512 skip=1 count=1 2>/dev/null | head -n1") == f"{clone}-data\n"
    assert host_ip("c1") != host_ip("c2") != host_ip(source)
    # The source went on over its own new overlay: the clones' writes are not there.
    assert sh(source, "dd if=/dev/vda bs=512 skip=1 count=1 2>/dev/null | tr -d '\\0'") == ""


def test_clones_copy_files_through_their_own_transfer_share(source, tmp_path):
    """vmctl cp goes through the virtio-fs transfer share: the source used it before the
    snapshot (its guest caches the source server's node ids), each clone serves a new folder
    with a new server; copies in and out of every clone must be exact."""
    sent = tmp_path / "before.txt"
    sent.write_text("copied into the source\n")
    assert vmctl("cp", str(sent), f"{source}:/tmp/").returncode == 0
    assert sh(source, "cat /tmp/before.txt") == "copied into the source\n"
    assert vmctl("snapshot", "create", "--memory", source, "ready").returncode == 0
    for clone in ("c1", "c2"):
        up = vmctl("up", "--from-snapshot", "ready", "--name", clone)
        assert up.returncode == 0, up.stderr
        assert sh(clone, "cat /tmp/before.txt") == "copied into the source\n"  # in the saved guest
        for round in range(3):
            payload = tmp_path / f"{clone}-{round}.txt"
            payload.write_text(f"{clone} round {round}\n" * 1000)
            copied = vmctl("cp", str(payload), f"{clone}:/tmp/")
            assert copied.returncode == 0, copied.stderr
            assert sh(clone, f"md5sum < /tmp/{payload.name}").split()[0] == \
                hashlib.md5(payload.read_bytes()).hexdigest()
            back = tmp_path / f"back-{clone}-{round}.txt"
            assert vmctl("cp", f"{clone}:/tmp/{payload.name}", str(back)).returncode == 0
            assert back.read_bytes() == payload.read_bytes()


def test_stop_start_keeps_what_was_written_to_disk(source):
    sh(source, "echo kept-across-stop | dd of=/dev/vda bs=512 count=1 conv=sync 2>/dev/null; sync")
    assert vmctl("stop", source, "--timeout", "60").returncode == 0
    assert json.loads(vmctl("ps", "--json").stdout)[0]["state"] == "stopped"
    started = vmctl("start", source)
    assert started.returncode == 0, started.stderr
    assert sh(source, "dd if=/dev/vda bs=512 count=1 2>/dev/null | head -n1") == "kept-across-stop\n"

