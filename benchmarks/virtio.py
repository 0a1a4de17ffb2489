"""virtio end to end: vmctl's native VMM vs QEMU microvm, same kernel, initramfs and disk.

    python benchmarks/virtio.py --nested        # here (kvm_pvm): inside the nested host
    python benchmarks/virtio.py --nested --vhost  # virtio-net through vhost-net in both VMMs
    python benchmarks/virtio.py --runs 3        # on a host whose /dev/kvm is hardware-backed

Both VMMs boot the reference kernel (`vmctl image paths` → bzImage) with the same initramfs
(static busybox + benchmarks/guest/vbench.c) and the same raw disk file, one vCPU, 256 MiB,
virtio-mmio devices (virtio-net in userspace in both, or with --vhost through vhost-net in
both), each on its own TAP with a point-to-point /30. In the
guest: sequential 1 MiB O_DIRECT write and read MB/s on /dev/vda, 4 KiB O_DIRECT random-read
IOPS at queue depth 1, one TCP stream guest → host and one host → guest. Runs alternate
vmctl, QEMU, vmctl, QEMU… so a change in the machine's load hits both alike.

Each result is taken twice: `guest_*` as the guest measured it, `host_*` on the host's clock
(the time between the guest's MARK and BENCH console lines, or the host TCP sink's
first-byte-to-end time), so a guest clock that runs wrong cannot skew the ratio. The table
reports medians over the runs. Writes benchmarks/results/virtio.json and prints the table.
Needs root (TAP devices), gcc, cpio, static busybox and qemu-system-x86_64.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fresh_bytecode import compile_vmctl  # noqa: E402
from publish import publish  # noqa: E402

from vmctl.images import locate  # noqa: E402

VBENCH = HERE / "guest" / "vbench.c"
RESULTS = HERE / "results" / "virtio.json"
DISK_MIB = 256
SEQ_MIB = 64
RANDREAD_SECONDS = 5
QUEUE_DEPTH = 32  # the second random-read test: this many requests in flight (Linux AIO)
TCP_MIB = 64
SINK_PORT, SOURCE_PORT = 5001, 5002
QEMU_TAP = "vmctlbq0"
QEMU_NET = ("172.31.255.1", "172.31.255.2")
BENCH_LINE = re.compile(r"^BENCH (\S+) ([0-9.]+) (\S+)(?: (\d+))?$")
TESTS = [("seqwrite_1m", "MB/s"), ("seqread_1m", "MB/s"), ("randread_4k", "IOPS"),
         (f"randread_4k_qd{QUEUE_DEPTH}", "IOPS"),
         ("tcp_guest_to_host", "MB/s"), ("tcp_host_to_guest", "MB/s")]

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for word in $(cat /proc/cmdline); do case $word in ip=*) IPSPEC=${word#ip=} ;; esac; done
H=$(echo $IPSPEC | cut -d: -f3)
echo MARK; /vbench seqwrite /dev/vda %(seq)d
echo MARK; /vbench seqread /dev/vda %(seq)d
echo MARK; /vbench randread /dev/vda %(rand)d
echo MARK; /vbench randread /dev/vda %(rand)d %(depth)d
echo MARK; /vbench tcpsend $H %(sink)d %(tcp)d
echo MARK; /vbench tcprecv $H %(source)d
echo VMCTL-EXIT 0
reboot -f
""" % {"seq": SEQ_MIB, "rand": RANDREAD_SECONDS, "sink": SINK_PORT, "source": SOURCE_PORT, "tcp": TCP_MIB,
     "depth": QUEUE_DEPTH}


def progress(message: str) -> None:
    print(f"[virtio-bench] {message}", file=sys.stderr, flush=True)


def build_initramfs(work: Path) -> Path:
    root = work / "root"
    for folder in ("bin", "proc", "sys", "dev"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    if busybox is None:
        raise SystemExit("a static busybox is needed (Debian: busybox-static)")
    shutil.copy(busybox, root / "bin/busybox")
    subprocess.run(["gcc", "-O2", "-static", "-o", str(root / "vbench"), str(VBENCH)], check=True)
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    archive = work / "initramfs.cpio"
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    with open(archive, "wb") as out:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, stdout=out, check=True)
    return archive


class TcpPeer(threading.Thread):
    """The host end of a TCP test. sink: reads one stream to its end and times it from the
    first byte to the end, on the host's clock. source: sends TCP_MIB and closes."""

    def __init__(self, port: int, sink: bool) -> None:
        super().__init__(daemon=True)
        self.sink = sink
        self.server = socket.create_server(("0.0.0.0", port))
        self.server.settimeout(900)
        self.received = 0
        self.seconds = 0.0

    def run(self) -> None:
        try:
            connection, _ = self.server.accept()
        except OSError:
            return
        with connection:
            if self.sink:
                first = None
                while chunk := connection.recv(1 << 20):
                    first = first or time.monotonic()
                    self.received += len(chunk)
                self.seconds = time.monotonic() - first if first else 0.0
            else:
                block = os.urandom(1 << 20)
                for _ in range(TCP_MIB):
                    connection.sendall(block)
        self.server.close()


def run_guest(command: list[str], timeout: float, log: Path) -> dict[str, float]:
    """Run one guest to its VMCTL-EXIT; its console goes to `log` as it runs."""
    sink, source = TcpPeer(SINK_PORT, sink=True), TcpPeer(SOURCE_PORT, sink=False)
    sink.start()
    source.start()
    started = time.monotonic()
    values: dict[str, float] = {}
    mark = started
    with open(log, "w") as out, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, text=True, errors="replace") as process:
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        for line in process.stdout:
            now = time.monotonic()
            out.write(line)
            out.flush()  # so a run can be followed while it goes
            text = line.strip()
            if text == "MARK":
                mark = now
            elif match := BENCH_LINE.match(text):
                name, value, count = match.group(1), float(match.group(2)), match.group(4)
                values[f"guest_{name}"] = value
                seconds = now - mark
                if name.startswith("seq"):
                    values[f"host_{name}"] = round(SEQ_MIB * 1.048576 / seconds, 1)
                elif name.startswith("randread") and count:
                    values[f"host_{name}"] = round(int(count) / seconds)
                elif name == "tcp_host_to_guest" and count:
                    values[f"host_{name}"] = round(int(count) / 1e6 / seconds, 1)  # incl. connect
            elif text.startswith("VMCTL-EXIT"):
                # Done. Not every VMM exits on the guest's reboot (microvm without an i8042
                # falls back to a BIOS restart), so stop it here.
                threading.Timer(10, process.kill).start()
        timer.cancel()
        returncode = process.wait()
    elapsed = time.monotonic() - started
    for peer in (sink, source):
        peer.server.close()
        peer.join(timeout=5)
    if sink.seconds:
        values["host_tcp_guest_to_host"] = round(sink.received / 1e6 / sink.seconds, 1)
    if len(values) < 2 * len(TESTS):
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{command[0]}: only {sorted(values)} measured (exit {returncode}):\n{tail}")
    values["wall_seconds"] = round(elapsed, 1)
    return values


def vmctl_command(kernel: Path, initrd: Path, disk: Path) -> list[str]:
    return [sys.executable, "-m", "vmctl", "boot", "--kernel", str(kernel), "--initrd", str(initrd),
            "--disk", str(disk), "--net", "isolated", "--cpus", "1", "--memory", "256M", "--no-input",
            "--timeout", "600", "--cmdline", "console=ttyS0 reboot=k panic=1 rdinit=/init"]


def qemu_command(kernel: Path, initrd: Path, disk: Path, vhost: bool) -> list[str]:
    host, guest = QEMU_NET
    return ["qemu-system-x86_64", "-M", "microvm,accel=kvm,acpi=off", "-cpu", "host", "-m", "256M", "-smp", "1",
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", f"console=ttyS0 reboot=k panic=1 rdinit=/init ip={guest}::{host}:255.255.255.252::eth0:off",
            "-drive", f"id=d0,file={disk},format=raw,if=none,cache=writeback,aio=threads",
            "-device", "virtio-blk-device,drive=d0",
            "-netdev", f"tap,id=n0,ifname={QEMU_TAP},script=no,downscript=no,vhost={'on' if vhost else 'off'}",
            "-device", "virtio-net-device,netdev=n0"]


def with_qemu_tap(run):
    """QEMU attaches to a TAP we prepare (address, IPv6 off) and always delete."""
    subprocess.run(["ip", "tuntap", "add", "dev", QEMU_TAP, "mode", "tap", "vnet_hdr"], check=True)
    try:
        Path(f"/proc/sys/net/ipv6/conf/{QEMU_TAP}/disable_ipv6").write_text("1")
        subprocess.run(["ip", "addr", "add", f"{QEMU_NET[0]}/30", "dev", QEMU_TAP], check=True)
        subprocess.run(["ip", "link", "set", QEMU_TAP, "up"], check=True)
        return run()
    finally:
        subprocess.run(["ip", "tuntap", "del", "dev", QEMU_TAP, "mode", "tap"], check=False)


def qemu_version() -> str:
    result = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    return result.stdout.splitlines()[0] if result.returncode == 0 else "unknown"


def measure(kernel: Path, runs: int, logs: Path | None, vhost: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="vmctl-virtio-bench-") as temp:
        work = Path(temp)
        logs = logs or work
        initrd = build_initramfs(work)
        disk = work / "disk.raw"
        with open(disk, "wb") as file:
            file.write(os.urandom(1 << 20) * DISK_MIB)  # allocated, so reads hit real blocks
        result: dict = {
            "config": {"disk_mib": DISK_MIB, "seq_mib": SEQ_MIB, "randread_seconds": RANDREAD_SECONDS,
                       "tcp_mib": TCP_MIB, "runs": runs, "kernel": str(kernel), "guest": "1 vCPU, 256 MiB",
                       "host_kernel": platform.release(), "nested": os.environ.get("VMCTL_NESTED") == "1",
                       "qemu": qemu_version(), "date": time.strftime("%Y-%m-%d"),
                       "net_data_path": "vhost-net (both VMMs)" if vhost else "userspace (both VMMs)"},
            "vmctl": [], "qemu": [],
        }
        for index in range(runs):  # alternate, so load changes hit both VMMs alike
            progress(f"run {index + 1}/{runs}: vmctl")
            result["vmctl"].append(run_guest(vmctl_command(kernel, initrd, disk), 900, logs / f"vmctl-{index}.log"))
            progress(f"run {index + 1}/{runs}: qemu")
            result["qemu"].append(with_qemu_tap(
                lambda index=index: run_guest(qemu_command(kernel, initrd, disk, vhost), 900, logs / f"qemu-{index}.log")))
        result["medians"] = {vmm: {key: statistics.median(row[key] for row in result[vmm]) for key in result[vmm][0]}
                             for vmm in ("vmctl", "qemu")}
        return result


def summary(result: dict) -> str:
    lines = ["| test | clock | vmctl | QEMU microvm | vmctl / QEMU |", "|---|---|---|---|---|"]
    for key, unit in TESTS:
        for clock in ("host", "guest"):
            name = f"{clock}_{key}"
            ours, theirs = result["medians"]["vmctl"][name], result["medians"]["qemu"][name]
            lines.append(f"| {key} ({unit}) | {clock} | {ours:g} | {theirs:g} | {ours / theirs:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--kernel", type=Path, help="guest kernel with virtio-mmio cmdline devices "
                        "(default: the reference bzImage from `vmctl image build`)")
    parser.add_argument("--runs", type=int, default=3, help="runs per VMM, alternating; medians reported (default 3)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    parser.add_argument("--nested", action="store_true", help="run inside the nested host (paravirtual-KVM hosts)")
    parser.add_argument("--memory", type=int, default=2048, help="nested host memory in MiB (default 2048)")
    parser.add_argument("--logs", type=Path, help="keep each guest's console log in this directory")
    parser.add_argument("--vhost", action="store_true",
                        help="virtio-net through vhost-net in both VMMs (vmctl's default where /dev/vhost-net "
                             "exists; QEMU vhost=on); without it both serve the queues in userspace")
    args = parser.parse_args(argv)
    compile_vmctl()  # measure vmctl as installed (fresh bytecode), not a recompiling checkout
    kernel = (args.kernel or locate().bzimage).resolve()
    if not kernel.exists():
        raise SystemExit(f"{kernel}: no such kernel (run `vmctl image build`)")
    output = args.output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.nested:
        inner = [sys.executable, str(Path(__file__).resolve()), "--kernel", str(kernel), "--runs", str(args.runs),
                 "--output", str(output), *(["--vhost"] if args.vhost else [])]
        shares = ["--share", str(output.parent)]
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            inner += ["--logs", str(args.logs.resolve())]
            shares += ["--share", str(args.logs.resolve())]
        return subprocess.run([sys.executable, "-m", "vmctl.nested", "--timeout", "3000", "--memory", str(args.memory),
                               *shares, "--", *inner], cwd=HERE.parent).returncode
    if not os.path.exists("/dev/net/tun"):
        raise SystemExit("/dev/net/tun is missing (load the tun module)")
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    if args.vhost and not os.access("/dev/vhost-net", os.R_OK | os.W_OK):
        raise SystemExit("--vhost: /dev/vhost-net is missing (load the vhost_net module)")
    os.environ["VMCTL_VHOST"] = "1" if args.vhost else "0"  # the vmctl guests inherit it
    result = measure(kernel, args.runs, args.logs, args.vhost)
    publish(result, output, summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
