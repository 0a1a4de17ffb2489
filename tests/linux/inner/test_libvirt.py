"""Real Linux guests through libvirt (`backend: libvirt`), to userspace and their commands (three boots).

- `vmctl run SPEC --show-boot`: a transient domain boots the reference kernel and busybox
  initramfs under QEMU/KVM; the console shows VMCTL-READY, the command's output and
  `VMCTL-EXIT 0`; nothing is left in libvirt or the state folder.
- `vmctl up` (a persistent domain): ready at VMCTL-READY, `exec` runs a command through the
  guest agent on its virtio console (hvc0, a unix socket of QEMU's; a 1.3 MB output whole),
  `ps` shows the command's status once the guest ends, `logs` its output, `rm` undefines the
  domain. With VMCTL_AGENT_CONSOLE=0 the domain has no virtio console: the agent on COM2.
- `image: debian` with a network: vmctl's TAP, `exec` over SSH (last test below).

Disks: the debian guest's root is vmctl's qcow2 overlay on virtio-pci (QEMU under libvirt
puts virtio on PCI, which the reference kernel has for this).

Inside the nested host there is no libvirtd running: the module fixture starts one (and
virtlogd) after adapting L1 (vmctl/backends/libvirt/daemons.py), and stops them afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmctl.images import locate

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed (scripts/libvirt-setup)")

VMCTL = str(Path(sys.executable).with_name("vmctl"))
URI = "qemu:///system"
COMMAND = 'echo libvirt-says-$((6*7)); uname -r'


@pytest.fixture
def state_dir(tmp_path, monkeypatch, libvirtd) -> Path:
    # The console log and agent socket live in the state folder: a local file system, not 9p.
    path = tmp_path / "state"
    monkeypatch.setenv("VMCTL_STATE_DIR", str(path))
    yield path
    conn = libvirt.open(libvirtd)
    try:
        left = [d.name() for d in conn.listAllDomains(0) if d.name().startswith("vmctl-lvl")]
    finally:
        conn.close()
    assert left == []
    machines = path / "machines"
    assert not machines.exists() or set(os.listdir(machines)) <= {".lock"}


def vmctl(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([VMCTL, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_run_boots_linux_to_userspace_through_libvirt(state_dir, tmp_path):
    spec = tmp_path / "vm.yaml"
    spec.write_text(f"machines:\n  lvl-run:\n    backend: libvirt\n    memory: 256M\n"
                    f"    command: [sh, -c, {json.dumps(COMMAND)}]\n")
    result = vmctl("run", str(spec), "--show-boot")
    assert result.returncode == 0, result.stderr + result.stdout[-2000:]
    console = result.stdout  # the whole serial log (the default cmdline boots `quiet`)
    ready = console.index("VMCTL-READY")
    assert ready < console.index("libvirt-says-42") < console.index("VMCTL-EXIT 0"), console[-2000:]
    assert "\n6.1." in console[ready:]  # `uname -r`: the reference kernel, booted by QEMU under libvirt


def test_persistent_domain_up_exec_ps_logs_rm(state_dir, tmp_path, libvirtd):
    # The command waits for a file that only `vmctl exec` creates, so the guest ends after it.
    waits = COMMAND + "; while [ ! -e /tmp/go ]; do sleep 0.2; done"
    spec = tmp_path / "vm.yaml"
    spec.write_text(f"machines:\n  lvl-up:\n    backend: libvirt\n    memory: 256M\n"
                    f"    environment: {{WHO: agent}}\n    command: [sh, -c, {json.dumps(waits)}]\n")
    up = vmctl("up", str(spec))  # returns once the console shows VMCTL-READY
    assert up.returncode == 0, up.stderr
    assert "lvl-up: ready in" in up.stderr
    try:
        assert agent_port("lvl-up") == ("/dev/hvc0", "virtio-console")
        big = vmctl("exec", "lvl-up", "--", "sh", "-c", "head -c 1000000 /dev/zero | base64 -w0")
        assert (big.returncode, big.stdout) == (0, base64.b64encode(bytes(1000000)).decode()), big.stderr
        run = vmctl("exec", "lvl-up", "--", "sh", "-c", "echo $WHO on $(hostname); echo oops >&2; touch /tmp/go; exit 5")
        assert (run.returncode, run.stdout) == (5, "agent on lvl-up\n"), run.stderr
        assert "oops" in run.stderr
        deadline = time.monotonic() + 300
        while (row := json.loads(vmctl("ps", "--json").stdout)[0])["state"] == "running":
            assert time.monotonic() < deadline, "the guest did not end"
            time.sleep(0.5)
        assert (row["backend"], row["state"], row["exit_code"]) == ("libvirt", "exited", 0), row
        conn = libvirt.open(libvirtd)
        try:
            domain = conn.lookupByName("vmctl-lvl-up")  # defined, shut off, still there for `logs`
            assert domain.isPersistent() and not domain.isActive()
        finally:
            conn.close()
        logs = vmctl("logs", "lvl-up").stdout
        assert logs.index("VMCTL-READY") < logs.index("libvirt-says-42") < logs.index("VMCTL-EXIT 0"), logs[-2000:]
    finally:
        assert vmctl("rm", "lvl-up").returncode == 0


def agent_port(machine: str) -> tuple[str, str]:
    """(the device the guest agent holds open, `vmctl status`'s agent_transport)."""
    run = vmctl("exec", machine, "--", "sh", "-c", "grep -o 'vmctl.agent=[^ ]*' /proc/cmdline; "
                "for f in /proc/[0-9]*/fd/*; do readlink $f; done 2>/dev/null | grep -E '^/dev/(hvc|ttyS1)' | sort -u")
    assert run.returncode == 0, run.stderr
    *word, device = run.stdout.split()
    assert word == (["vmctl.agent=hvc0"] if device == "/dev/hvc0" else []), run.stdout
    return device, json.loads(vmctl("status", machine).stdout)["agent_transport"]


def test_exec_over_com2_without_the_virtio_console(state_dir, tmp_path, monkeypatch):
    """VMCTL_AGENT_CONSOLE=0: the domain has COM2 only (as before the virtio console), and exec still works."""
    monkeypatch.setenv("VMCTL_AGENT_CONSOLE", "0")
    spec = tmp_path / "vm.yaml"
    spec.write_text("machines:\n  lvl-com2:\n    backend: libvirt\n    memory: 256M\n"
                    "    command: [sh, -c, 'while [ ! -e /tmp/go ]; do sleep 0.2; done']\n")
    up = vmctl("up", str(spec))
    assert up.returncode == 0, up.stderr
    try:
        assert "<console type=\"unix\">" not in (state_dir / "machines/lvl-com2/domain.xml").read_text()
        assert agent_port("lvl-com2") == ("/dev/ttyS1", "uart")
        # ~0.7 ms a byte in L1. (A reply still on its way when the guest powers off is lost:
        # a script that also ends the guest's command gets only a short answer back.)
        run = vmctl("exec", "lvl-com2", "--", "sh", "-c", "head -c 3000 /dev/zero | base64 -w0")
        assert (run.returncode, run.stdout) == (0, base64.b64encode(bytes(3000)).decode()), run.stderr
    finally:
        assert vmctl("rm", "lvl-com2").returncode == 0


def test_debian_guest_on_vmctls_network_answers_exec_over_ssh(state_dir, tmp_path):
    """`image: debian` through libvirt: root on a virtio-pci overlay disk, vmctl's own TAP and
    /30 (as native VMs get), sshd with the key vmctl made: `exec` goes over SSH (paramiko)."""
    if not locate("debian").rootfs_qcow2.exists():
        pytest.skip("the debian image is not built (vmctl image build --profile debian)")
    spec = tmp_path / "vm.yaml"
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "hello").write_text("from the host\n")
    nine_p = "CONFIG_9P_FS=y" in locate("debian").kernel_config.read_text()  # images of before mounts: no 9p
    spec.write_text("machines:\n  lvl-ssh:\n    backend: libvirt\n    image: debian\n    memory: 512M\n"
                    "    network: {mode: isolated, forwards: ['0:22']}\n    environment: {WHO: ssh}\n"
                    + (f"    mounts: [{{host: {shared}, guest: /mnt/shared}}]\n" if nine_p else ""))
    up = vmctl("up", str(spec))
    assert up.returncode == 0, up.stderr
    try:
        if nine_p:  # the host folder over QEMU's 9p, mounted by /init; a guest write lands in the folder
            run = vmctl("exec", "lvl-ssh", "--", "sh", "-c", "cat /mnt/shared/hello; echo back > /mnt/shared/from-guest; "
                        "grep ' /mnt/shared ' /proc/mounts | cut -d' ' -f3")
            assert (run.returncode, run.stdout) == (0, "from the host\n9p\n"), run.stderr
            assert (shared / "from-guest").read_text() == "back\n"
        # forwards on libvirt: a free host port relayed to the guest's sshd
        port = json.loads((state_dir / "machines/lvl-ssh/network.json").read_text())["forwards"][0][0]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            assert connection.recv(64).startswith(b"SSH-2.0")
        network = json.loads((state_dir / "machines/lvl-ssh/network.json").read_text())
        assert Path(f"/sys/class/net/{network['tap']}").exists()
        run = vmctl("exec", "lvl-ssh", "--", "sh", "-c", "echo $WHO; echo ${SSH_CONNECTION%% *}; findmnt -no SOURCE /")
        assert run.returncode == 0, run.stderr
        who, client, root = run.stdout.split()
        assert (who, client, root) == ("ssh", network["host_ip"], "/dev/vda")  # over SSH, from the TAP's host end
        row = json.loads(vmctl("ps", "--json").stdout)[0]
        assert (row["backend"], row["state"]) == ("libvirt", "running")
        if shutil.which("ssh"):  # `vmctl ssh` execs the OpenSSH client with the machine's key
            ssh = vmctl("ssh", "lvl-ssh", "--", "hostname")
            assert (ssh.returncode, ssh.stdout.strip()) == (0, "lvl-ssh"), ssh.stderr
        _stop_start_and_a_live_snapshot(state_dir)
    finally:
        assert vmctl("rm", "lvl-ssh").returncode == 0
        vmctl("snapshot", "delete", "lvl-kept")
    assert not Path(f"/sys/class/net/{network['tap']}").exists()  # the TAP went with the machine


def _stop_start_and_a_live_snapshot(state_dir: Path) -> None:
    """A file written before `vmctl stop` is there after `vmctl start`; a live disk snapshot
    (libvirt's external disk-only snapshot) of the running Linux guest, then `restore` after
    a later write, gives the file as it was at the snapshot."""

    def guest(script: str) -> str:
        run = vmctl("exec", "lvl-ssh", "--", "sh", "-c", script)
        assert run.returncode == 0, run.stderr
        return run.stdout

    def cycle() -> None:
        stopped = vmctl("stop", "lvl-ssh", "--timeout", "20")
        assert stopped.returncode == 0, stopped.stderr
        assert json.loads(vmctl("ps", "--json").stdout)[0]["state"] == "stopped"
        started = vmctl("start", "lvl-ssh")  # waits until the guest is ready again
        assert started.returncode == 0, started.stderr

    guest("echo kept > /root/kept; sync")
    made = vmctl("snapshot", "create", "lvl-ssh", "lvl-kept")
    assert made.returncode == 0, made.stderr
    guest("echo changed > /root/kept; sync")
    cycle()
    assert guest("cat /root/kept") == "changed\n"  # stop/start keeps what the guest wrote
    assert vmctl("stop", "lvl-ssh", "--timeout", "20").returncode == 0
    restored = vmctl("snapshot", "restore", "lvl-ssh", "lvl-kept")
    assert restored.returncode == 0, restored.stderr
    assert vmctl("start", "lvl-ssh").returncode == 0
    assert guest("cat /root/kept") == "kept\n"


def test_oci_image_through_libvirt(state_dir, tmp_path):
    """`image: oci:…` with backend libvirt: the layer disks read-only, the upper a qcow2, the
    same files as the container and the native VM show (vmctl.oci.samples)."""
    from vmctl.oci.samples import CHECK_SCRIPT, expected_check_output, write_samples

    env = {**os.environ, "VMCTL_OCI_DIR": str(tmp_path / "oci")}
    a, _ = write_samples(tmp_path)
    imported = subprocess.run([VMCTL, "image", "import", str(a)], capture_output=True, text=True, env=env, timeout=300)
    assert imported.returncode == 0, imported.stderr
    spec = tmp_path / "oci.yaml"
    spec.write_text(f"machines:\n  ocivm:\n    backend: libvirt\n    image: oci:sample-a\n    memory: 256M\n"
                    f"    libvirt: {{uri: '{URI}'}}\n")
    run = subprocess.run([VMCTL, "run", str(spec), "--", "sh", "-c", CHECK_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout == expected_check_output()
    assert not [d for d in libvirt.open(URI).listAllDomains() if d.name().startswith("vmctl-ocivm")]
