"""Real Linux drivers against vmctl's virtio devices, in one guest boot per network data path
(~15 s each under TCG): virtio-net served by the kernel (vhost-net, the default where
/dev/vhost-net exists) and by vmctl's Python device (VMCTL_VHOST=0).

The guest (reference kernel, busybox rootfs) mounts its root from virtio-blk: a qcow2
overlay on the base image, made with our qcow2 code. Its command writes a file, reads
/dev/hwrng, pings the host's TAP address over virtio-net and answers a line on /dev/hvc0
(virtio-console, joined to a Unix socket). After the VM is gone the test converts the
overlay to raw with our qcow2 code and reads the file back with debugfs, and checks that
the TAP went with the VM. Each test below asserts one part of that run.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmctl.disk.qcow2.create import create_overlay
from vmctl.disk.qcow2.ops import convert
from vmctl.guest_contract import READY_MARKER, exit_code
from vmctl.images import locate
from vmctl.virtio.mmio import VENDOR_ID

TOKEN = "written-by-the-guest-" + os.urandom(6).hex()
HVC_QUESTION = "question-" + os.urandom(4).hex()

# Guest side. hvc0 is opened once (fd 3), switched to raw without echo, and only then
# announced on the serial console, so the host's line cannot reach a tty that would echo it.
GUEST_SCRIPT = f"""
echo "ROOT-DEV $(stat -c %t:%T /dev/vda) $(stat -c %d /) $(cat /sys/block/vda/device/vendor 2>/dev/null)"
echo {TOKEN} > /hello.txt && sync && echo FILE-WRITTEN
echo "BLK-QUEUES $(ls /sys/block/vda/mq | wc -l)"
for i in 0 1 2 3 4 5 6 7; do (dd if=/dev/vda bs=64k count=32 skip=$((i*32)) iflag=direct 2>/dev/null | md5sum >/tmp/p$i) & done; wait
flood=ok
for i in 0 1 2 3 4 5 6 7; do
    dd if=/dev/vda bs=64k count=32 skip=$((i*32)) 2>/dev/null | md5sum >/tmp/s$i
    cmp -s /tmp/p$i /tmp/s$i || flood="differs-$i"
done
echo "FLOOD $flood"
echo "RNG-CURRENT $(cat /sys/class/misc/hw_random/rng_current)"
echo "RNG-BYTES $(head -c 32 /dev/hwrng | od -An -v -tx1 | tr -d ' \\n')"
for word in $(cat /proc/cmdline); do case $word in ip=*) HOST=$(echo ${{word#ip=}} | cut -d: -f3) ;; esac; done
ping -c 3 -W 5 $HOST; echo "PING-STATUS $?"
exec 3<>/dev/hvc0
stty raw -echo <&3
echo HVC-READY
read -r line <&3
echo "answer to $line" >&3
echo HVC-DONE
"""


@dataclass
class GuestRun:
    returncode: int
    console: str
    overlay: Path
    base_sha256_before: str
    base_sha256_after: str
    hvc_answer: str
    new_links_during: set[str] = field(default_factory=set)
    new_links_after: set[str] = field(default_factory=set)
    data_path: str = "python"

    def line(self, prefix: str) -> str:
        found = [line[len(prefix):].strip() for line in self.console.splitlines() if line.startswith(prefix)]
        assert found, f"no {prefix!r} line on the console:\n{self.tail()}"
        return found[-1]

    def tail(self) -> str:
        return "\n".join(self.console.splitlines()[-40:])


def _ensure_tun() -> None:
    """/dev/net/tun: the nested host loads tun.ko (vmctl.nested.l1_kernel.NEEDED_MODULES)."""
    if not Path("/sys/class/misc/tun").exists():
        pytest.skip("no tun driver in this kernel (the nested host loads tun.ko from its kernel cache; "
                    "an L1 kernel cache made before 'tun' joined NEEDED_MODULES lacks it: delete it)")
    if not Path("/dev/net/tun").exists():
        os.makedirs("/dev/net", exist_ok=True)
        os.mknod("/dev/net/tun", 0o600 | 0o020000, os.makedev(10, 200))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


class HvcClient(threading.Thread):
    """Once the guest says HVC-READY: connect to the console socket, send one line, read the answer."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.go = threading.Event()
        self.answer = ""

    def run(self) -> None:
        if not self.go.wait(timeout=300):
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(60)
            client.connect(str(self.path))
            client.sendall(f"{HVC_QUESTION}\n".encode())
            received = b""
            try:
                while b"\n" not in received and (chunk := client.recv(4096)):
                    received += chunk
            except OSError:
                pass
            self.answer = received.decode(errors="replace").strip()


@pytest.fixture(scope="module", params=["vhost", "python"])
def guest(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> GuestRun:
    data_path = request.param
    if data_path == "vhost" and not os.access("/dev/vhost-net", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/vhost-net (module vhost_net not loaded): the kernel data path cannot run here")
    images = locate()
    missing = [name for name in ("bzimage", "rootfs_qcow2") if not getattr(images, name).exists()]
    if missing:
        pytest.skip(f"guest images not built ({', '.join(missing)}): run `vmctl image build`")
    _ensure_tun()
    work = tmp_path_factory.mktemp("virtio")
    overlay = work / "root.qcow2"
    create_overlay(str(images.rootfs_qcow2), str(overlay), absolute=True)
    socket_path = work / "hvc.sock"
    base_before = _sha256(images.rootfs_qcow2)
    script = base64.b64encode(GUEST_SCRIPT.encode()).decode()
    exe = shutil.which("vmctl", path=os.path.dirname(sys.executable))
    command = [exe, "-v", "boot", "--kernel", str(images.bzimage), "--cpus", "2", "--memory", "256M",
               "--disk", str(overlay), "--rng", "--net", "isolated", "--console-channel", str(socket_path),
               "--no-input", "--timeout", "300",
               "--cmdline", f"console=ttyS0 reboot=k panic=1 root=/dev/vda rw vmctl.cmd={script}"]
    links_before = _links()
    client = HvcClient(socket_path)
    client.start()
    lines: list[str] = []
    links_during: set[str] = set()
    environment = {**os.environ, "VMCTL_VHOST": "1" if data_path == "vhost" else "0"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          text=True, errors="replace", env=environment) as process:
        for line in process.stdout:
            lines.append(line.rstrip("\r\n"))
            if line.strip() == "HVC-READY":
                links_during = _links() - links_before
                client.go.set()
        returncode = process.wait()
    client.go.set()  # never hang the thread if the guest died before HVC-READY
    client.join(timeout=90)
    return GuestRun(returncode=returncode, console="\n".join(lines), overlay=overlay,
                    base_sha256_before=base_before, base_sha256_after=_sha256(images.rootfs_qcow2),
                    hvc_answer=client.answer, new_links_during=links_during,
                    new_links_after=_links() - links_before, data_path=data_path)


def test_guest_runs_to_its_exit_status(guest: GuestRun) -> None:
    assert READY_MARKER in guest.console, guest.tail()
    codes = [code for line in guest.console.splitlines() if (code := exit_code(line)) is not None]
    assert codes == [0], guest.tail()
    assert guest.returncode == 0, guest.tail()


def test_root_is_virtio_blk_and_the_file_reads_back_from_the_overlay(guest: GuestRun, tmp_path: Path) -> None:
    # / lives on /dev/vda (virtio-blk's dynamic major; stat prints it in hex), whose virtio
    # device reports vmctl's vendor id ("MCTL").
    vda, root_dev, vendor = guest.line("ROOT-DEV ").split()
    major, minor = (int(part, 16) for part in vda.split(":"))
    assert int(root_dev) == os.makedev(major, minor), guest.tail()
    assert int(vendor, 16) == VENDOR_ID
    assert "FILE-WRITTEN" in guest.console, guest.tail()
    raw = tmp_path / "root.raw"
    convert(str(guest.overlay), str(raw), out_format="raw")  # our qcow2 reader: overlay + base
    shown = subprocess.run(["debugfs", "-R", "cat /hello.txt", str(raw)], capture_output=True, text=True)
    assert shown.stdout.strip() == TOKEN, shown.stderr
    check = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert guest.base_sha256_after == guest.base_sha256_before  # the base image was never written


def test_blk_has_one_queue_per_vcpu_and_survives_a_flood_of_parallel_reads(guest: GuestRun) -> None:
    # 2 vCPUs: two request queues (VIRTIO_BLK_F_MQ); 8 concurrent O_DIRECT readers keep both
    # full, and each part reads back the same as a later sequential read of it.
    assert guest.line("BLK-QUEUES ") == "2", guest.tail()
    assert guest.line("FLOOD ") == "ok", guest.tail()


def test_guest_reads_hwrng_from_virtio_rng(guest: GuestRun) -> None:
    assert guest.line("RNG-CURRENT ") == "virtio_rng.0"
    data = bytes.fromhex(guest.line("RNG-BYTES "))
    assert len(data) == 32 and len(set(data)) > 8  # 32 bytes, not a constant fill


def test_virtio_net_data_path_is_the_one_asked_for(guest: GuestRun) -> None:
    served_by_kernel = "virtio-net: vhost-net serves the queues" in guest.console
    assert served_by_kernel == (guest.data_path == "vhost"), guest.tail()
    assert "serving the queues in Python" not in guest.console  # no failed vhost setup either


def test_guest_pings_the_host_over_virtio_net(guest: GuestRun) -> None:
    assert guest.line("PING-STATUS ") == "0", guest.tail()
    assert re.search(r"3 packets transmitted, 3 packets received", guest.console), guest.tail()
    assert guest.new_links_during and all(name.startswith("vmctl") for name in guest.new_links_during)


def test_hvc0_round_trip_through_the_console_socket(guest: GuestRun) -> None:
    assert guest.hvc_answer == f"answer to {HVC_QUESTION}", guest.tail()
    assert "HVC-DONE" in guest.console


def test_no_network_device_outlives_the_vm(guest: GuestRun) -> None:
    assert not guest.new_links_after
