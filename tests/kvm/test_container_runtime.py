"""`backend: container` with the real OCI runtime (crun, or runc on cgroup-hybrid hosts), as
root, from the busybox base tree the VMs are built from, through the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from vmctl.errors import VmctlError


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "containers need root (overlay mounts, cgroups, veths)"
    from vmctl.backends.container.runtime import choose
    from vmctl.images import locate

    try:
        choose()
    except VmctlError as error:
        return str(error)
    if not (locate("busybox").rootfs_tree / "bin").is_dir():
        return "the busybox base tree is not built (vmctl image build)"
    return None


SKIP = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

MEMORY_LIMIT = "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes"


@pytest.fixture
def spec(tmp_path, monkeypatch):
    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path / "state"))
    path = tmp_path / "c.yaml"
    path.write_text(
        "defaults:\n  backend: container\n"
        "machines:\n"
        "  a:\n    memory: 48M\n    environment: {GREETING: hello there}\n"
        "  b:\n    network: isolated\n"
    )
    return path


def ps(vmctl_cli) -> dict:
    result = vmctl_cli("ps", "--json")
    assert result.returncode == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


def base_fingerprint() -> str:
    """Every path, mode, size, mtime and content of the base tree."""
    from vmctl.images import locate

    tree = locate("busybox").rootfs_tree
    digest = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(tree)):
        for name in sorted(dirs + files):
            path = Path(root, name)
            info = path.lstat()
            digest.update(f"{path}:{info.st_mode}:{info.st_size}:{info.st_mtime_ns}\n".encode())
            if path.is_file() and not path.is_symlink():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def host_traces(container_id: str, folder: Path, veth: str) -> list[str]:
    """What a container could leave on the host: mounts, its veth, cgroups, processes.

    Only this container's own veth counts: other tests or users may hold `vmctlv*` links."""
    traces = [line for line in Path("/proc/mounts").read_text().splitlines() if str(folder) in line]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    traces += [name for name in re.findall(r"\d+: (vmctlv\d+)[@:]", links) if name == veth]
    from vmctl.backends.container.runtime import cgroup_dirs

    traces += [str(p) for p in cgroup_dirs(container_id) if p.exists()]
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    traces += [line for line in processes.splitlines() if container_id in line or str(folder) in line]
    return traces


def test_run_exit_code_output_environment_and_memory_limit(spec, vmctl_cli, tmp_path):
    result = vmctl_cli("run", str(spec), "--name", "a", "--", "sh", "-c",
                       f"echo $GREETING; {MEMORY_LIMIT}; echo oops >&2; exit 3")
    assert result.returncode == 3, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "hello there"
    assert int(lines[1]) == 48 << 20  # the cgroup limit, as the container sees it
    assert "oops" in lines  # stderr goes to the console log too, like a VM's console
    assert sorted(os.listdir(tmp_path / "state" / "machines")) == [".lock"]  # run removes it


def test_base_is_untouched_and_two_containers_do_not_see_each_others_writes(spec, vmctl_cli, tmp_path):
    before = base_fingerprint()
    assert vmctl_cli("up", str(spec)).returncode == 0
    try:
        write = "echo mine > /root/only-a && echo changed >> /etc/profile && rm /etc/hostname && echo ok"
        result = vmctl_cli("exec", "a", "--", "sh", "-c", write)
        assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr
        seen_by_a = vmctl_cli("exec", "a", "--", "sh", "-c", "cat /root/only-a; tail -1 /etc/profile; ls /etc/hostname")
        assert seen_by_a.stdout.splitlines()[:2] == ["mine", "changed"] and seen_by_a.returncode != 0
        seen_by_b = vmctl_cli("exec", "b", "--", "sh", "-c", "ls /root/only-a; tail -1 /etc/profile; cat /etc/hostname")
        assert seen_by_b.returncode == 0 and "changed" not in seen_by_b.stdout
        assert "No such file" in seen_by_b.stderr  # /root/only-a
        upper = tmp_path / "state/machines/a/rootfs/upper"
        assert (upper / "root/only-a").read_text() == "mine\n"  # the write went to a's upper layer
        assert base_fingerprint() == before
    finally:
        assert vmctl_cli("rm", "a", "b").returncode == 0
    assert base_fingerprint() == before


def test_up_ps_exec_down_rm(spec, vmctl_cli, tmp_path):
    up = vmctl_cli("up", str(spec), "b")
    assert up.returncode == 0 and "started (container" in up.stderr, up.stderr
    table = vmctl_cli("ps").stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "BACKEND", "STATE"]
    assert table[1].split()[:3] == ["b", "container", "running"]
    row = ps(vmctl_cli)["b"]
    network = row["network"]
    ping = vmctl_cli("exec", "b", "--", "ping", "-c", "1", "-W", "5", network["host_ip"])
    assert ping.returncode == 0, ping.stdout + ping.stderr  # the veth works both ways
    failing = vmctl_cli("exec", "b", "--", "sh", "-c", "hostname; exit 7")
    assert (failing.returncode, failing.stdout) == (7, "b\n")
    assert vmctl_cli("down", "b").returncode == 0
    row = ps(vmctl_cli)["b"]
    assert (row["state"], row["exit_code"]) == ("exited", 0)  # the idle init obeys SIGTERM
    assert "not running" in vmctl_cli("exec", "b", "--", "true").stderr
    assert vmctl_cli("rm", "b").returncode == 0
    assert ps(vmctl_cli) == {}
    assert sorted(os.listdir(tmp_path / "state" / "machines")) == [".lock"]


@pytest.mark.parametrize("victim", ["init", "monitor"])
def test_kill_9_then_rm_leaves_nothing(spec, vmctl_cli, tmp_path, victim):
    assert vmctl_cli("up", str(spec), "b").returncode == 0
    folder = tmp_path / "state/machines/b"
    record = json.loads((folder / "machine.json").read_text())
    container_id = record["plan"]["container_id"]
    veth = ps(vmctl_cli)["b"]["network"]["veth"]
    assert veth in host_traces(container_id, folder, veth)  # the mount, veth, cgroup and processes exist
    pid = record["pid"] if victim == "init" else record["plan"]["monitor_pid"]
    os.kill(pid, signal.SIGKILL)
    if victim == "init":
        deadline = time.monotonic() + 10
        while ps(vmctl_cli)["b"]["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        row = ps(vmctl_cli)["b"]
        assert (row["state"], row["exit_code"], row["detail"]) == ("exited", 137, "killed by SIGKILL")
    else:
        assert ps(vmctl_cli)["b"]["state"] == "running"  # the container outlives its monitor
    assert vmctl_cli("rm", "b").returncode == 0
    assert host_traces(container_id, folder, veth) == []
    assert not folder.exists()  # bundle, upper layer, runtime state


def test_a_failed_start_leaves_nothing(spec, vmctl_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("VMCTL_OCI_RUNTIME", "false")  # `false create ...` fails after the overlay is mounted
    result = vmctl_cli("up", str(spec), "b")
    assert result.returncode == 1 and result.stderr.startswith("vmctl: error: b: false create failed"), result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "state/machines/b").exists()
    assert [line for line in Path("/proc/mounts").read_text().splitlines() if str(tmp_path) in line] == []


def test_compare_container_and_native(tmp_path, vmctl_cli, monkeypatch):
    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path / "state"))
    spec = tmp_path / "work.yaml"
    spec.write_text("machines:\n  work:\n    memory: 64M\n"
                    "    command: dd if=/dev/zero of=/root/blob bs=1M count=4 2>/dev/null && sync\n")
    out = tmp_path / "compare.json"
    result = vmctl_cli("compare", str(spec), "--runs", "1", "--only", "native", "--only", "container", "--json", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert set(data) >= {"native", "container", "kvm_mode"} and "vm" not in data
    for kind in ("native", "container"):
        assert data[kind]["disk_bytes"] >= 4 << 20  # the blob landed in that instance's upper dir
        assert data[kind]["exit_codes"] == [0]
    assert data["container"]["pss_bytes"] > data["container"]["samples"][0]["pss_monitor_bytes"] > 0
    assert "| container (" in result.stdout and "| native (chroot, same tree) |" in result.stdout


def test_pytest_fixture_runs_containers(vmctl_guest, tmp_path, monkeypatch):
    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path / "state"))
    box = vmctl_guest({"backend": "container", "memory": "32M", "environment": {"WHO": "fixture"}})
    assert box.record.backend == "container"
    assert box.exec("echo $WHO; id -u") == (0, "fixture\n0\n", "")
    box.put(b"\x00payload\xff", "/root/data")
    assert box.get("/root/data") == b"\x00payload\xff"


def test_capabilities_seccomp_and_mounts_as_configured(spec, vmctl_cli):
    result = vmctl_cli("run", str(spec), "--name", "a", "--", "sh", "-c",
                       "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status; mount -t tmpfs x /mnt || echo denied; "
                       "grep -E ' / | /tmp | /sys ' /proc/mounts | cut -d' ' -f2-4 | cut -d, -f1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["CapEff:\t00000000a80425fb", "NoNewPrivs:\t1", "Seccomp:\t2"]  # Docker's default set
    assert "denied" in lines
    assert {"/ overlay rw", "/tmp tmpfs rw", "/sys sysfs ro"} <= set(lines)


def test_stop_start_keeps_the_containers_files(spec, vmctl_cli):
    assert vmctl_cli("up", str(spec), "a").returncode == 0
    try:
        assert vmctl_cli("exec", "a", "--", "sh", "-c", "echo kept > /root/file").returncode == 0
        assert vmctl_cli("stop", "a", "--timeout", "2").returncode == 0
        assert ps(vmctl_cli)["a"]["state"] == "stopped"
        started = vmctl_cli("start", "a")
        assert started.returncode == 0, started.stderr
        assert ps(vmctl_cli)["a"]["state"] == "running"
        assert vmctl_cli("exec", "a", "--", "cat", "/root/file").stdout == "kept\n"
    finally:
        assert vmctl_cli("rm", "a").returncode == 0


def _one_line_error(result, message: str) -> None:
    assert result.returncode != 0 and result.stderr == f"vmctl: error: {message}\n", result.stderr


def test_disk_snapshots_freeze_the_upper_layer_and_restore_goes_back(spec, vmctl_cli, tmp_path):
    """Each snapshot freezes the upper layer into a lower layer of the mount; a file deleted
    from the image after a snapshot stays deleted in the next one (its whiteout is in a lower
    layer now); restore goes back to any of them; a layer a later snapshot stands on is kept."""
    before = base_fingerprint()
    state = tmp_path / "state"

    def run(script: str) -> str:
        result = vmctl_cli("exec", "a", "--", "sh", "-c", script)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def stop() -> None:
        assert vmctl_cli("stop", "a", "--timeout", "2").returncode == 0
        assert ps(vmctl_cli)["a"]["state"] == "stopped"

    def start() -> None:
        started = vmctl_cli("start", "a")
        assert started.returncode == 0, started.stderr

    def snapshot(*args: str) -> str:
        result = vmctl_cli("snapshot", *args)
        assert result.returncode == 0, result.stderr
        return result.stderr

    assert vmctl_cli("up", str(spec), "a").returncode == 0
    folder = state / "machines/a"
    container_id = json.loads((folder / "machine.json").read_text())["plan"]["container_id"]
    try:
        run("echo one > /root/file")
        _one_line_error(vmctl_cli("snapshot", "create", "a", "live"),
                        "a: running: vmctl stop a first (a container's layers change only while it is stopped: "
                        "vmctl snapshot create)")
        _one_line_error(vmctl_cli("snapshot", "create", "--memory", "a", "m"),
                        "a: --memory snapshots are for native (kvm) and libvirt machines; this one is container "
                        "(vmctl snapshot create a m snapshots its disks)")
        assert not (state / "snapshots/live").exists() and not (state / "snapshots/m").exists()
        stop()
        assert "s1: disk snapshot of a (1 disk layer(s))" in snapshot("create", "a", "s1")
        _one_line_error(vmctl_cli("up", "--from-snapshot", "s1", "--name", "x"),
                        "snapshot 's1' is of the container machine a: only snapshots of native (kvm) machines "
                        "start clones (vmctl snapshot restore a s1)")
        start()
        assert run("cat /root/file") == "one\n"  # from the frozen layer now
        host_mount = [line for line in Path("/proc/mounts").read_text().splitlines() if str(folder) in line]
        assert any(f"lowerdir={state}/snapshots/s1/upper:" in line for line in host_mount), host_mount
        run("echo two > /root/file; rm /etc/hostname")
        stop()
        snapshot("create", "a", "s2")
        start()
        assert run("cat /root/file; ls /etc/hostname 2>&1 || true") == "two\nls: /etc/hostname: No such file or directory\n"
        run("echo three > /root/file")
        stop()

        snapshot("restore", "a", "s1")
        start()
        assert run("cat /root/file; ls /etc/hostname") == "one\n/etc/hostname\n"
        stop()
        snapshot("restore", "a", "s2")
        start()
        assert run("cat /root/file; ls /etc/hostname 2>&1 || true") == "two\nls: /etc/hostname: No such file or directory\n"
        listed = json.loads(vmctl_cli("snapshot", "list", "--json").stdout)
        assert [(s["name"], s["backend"], s["layers"]) for s in listed] == [("s1", "container", 1), ("s2", "container", 2)]
        stop()

        _one_line_error(vmctl_cli("snapshot", "restore", "a", "nope"), "no snapshot named 'nope' (snapshots: s1, s2)")
        _one_line_error(vmctl_cli("snapshot", "delete", "s1"),
                        "snapshot 's1': later snapshot(s) s2 stand on its layer (delete those first)")
        assert "its layer stays under a" in snapshot("delete", "s2")
        assert "its layer stays under a" in snapshot("delete", "s1")
        assert json.loads(vmctl_cli("snapshot", "list", "--json").stdout) == []
        start()
        assert run("cat /root/file; ls /etc/hostname 2>&1 || true") == "two\nls: /etc/hostname: No such file or directory\n"
    finally:
        assert vmctl_cli("rm", "a").returncode == 0
    assert host_traces(container_id, folder, "-") == [] and not folder.exists()
    assert os.listdir(state / "snapshots") == []
    assert base_fingerprint() == before
