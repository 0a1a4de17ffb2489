"""virtio benchmark: vmctl's native VMM vs QEMU microvm, same kernel, initramfs and disk.

    python -m vmctl.virtio.bench --kernel bzImage [--nested] [--output results.json]

Inside the guest (a static helper, vbench.c): sequential 1 MiB O_DIRECT read and write MB/s
on /dev/vda (a raw file on the host, page cache on the host side for both VMMs), 4 KiB
random-read IOPS at queue depth 1, and one TCP stream guest → host. Both VMMs use virtio-mmio
devices without vhost, a TAP with a point-to-point /30, one vCPU and 256 MiB.

Needs hardware-backed KVM, root (TAP devices), gcc, cpio and a static busybox. On a
paravirtual-KVM host `--nested` re-runs the benchmark inside the nested host.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).parent
DISK_MIB = 256
SEQ_MIB = 64
RANDREAD_SECONDS = 5
TCP_MIB = 64
TCP_PORT = 5001
QEMU_TAP = "vmctlbq0"
QEMU_NET = ("172.31.255.1", "172.31.255.2")
BENCH_LINE = re.compile(r"^BENCH (\S+) ([0-9.]+) (\S+)(?: (\d+))?$")

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for word in $(cat /proc/cmdline); do case $word in ip=*) IPSPEC=${word#ip=} ;; esac; done
G=$(echo $IPSPEC | cut -d: -f1); H=$(echo $IPSPEC | cut -d: -f3)
ip addr add $G/30 dev eth0 && ip link set eth0 up
echo MARK; /vbench seqwrite /dev/vda %(seq)d
echo MARK; /vbench seqread /dev/vda %(seq)d
echo MARK; /vbench randread /dev/vda %(rand)d
echo MARK; /vbench tcpsend $H %(port)d %(tcp)d
echo VMCTL-EXIT 0
reboot -f
""" % {"seq": SEQ_MIB, "rand": RANDREAD_SECONDS, "port": TCP_PORT, "tcp": TCP_MIB}


def build_initramfs(work: Path) -> Path:
    root = work / "root"
    for folder in ("bin", "proc", "sys", "dev"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    if busybox is None:
        raise SystemExit("a static busybox is needed (Debian: busybox-static)")
    shutil.copy(busybox, root / "bin/busybox")
    subprocess.run(["gcc", "-O2", "-static", "-o", str(root / "vbench"), str(HERE / "vbench.c")], check=True)
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    archive = work / "initramfs.cpio"
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    with open(archive, "wb") as out:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, stdout=out, check=True)
    return archive


class TcpSink(threading.Thread):
    """The host end of the TCP test: reads one stream to its end, then closes; times it from
    the first byte to the end, on the host's clock."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.server = socket.create_server(("0.0.0.0", TCP_PORT))
        self.server.settimeout(900)
        self.received = 0
        self.seconds = 0.0

    def run(self) -> None:
        try:
            connection, _ = self.server.accept()
        except OSError:
            return
        with connection:
            first = None
            while chunk := connection.recv(1 << 20):
                first = first or time.monotonic()
                self.received += len(chunk)
            self.seconds = time.monotonic() - first if first else 0.0
        self.server.close()


def run_guest(command: list[str], timeout: float, log: Path) -> dict[str, float]:
    """Run one guest; its console goes to `log` as it runs. Each result is reported twice:
    as the guest measured it (`guest_*`, its own clock) and as the host saw it (`host_*`:
    the time between the guest's MARK line and its BENCH line on the console, or for TCP the
    sink's first-byte-to-end time), so a guest clock that runs wrong cannot skew the ratio."""
    sink = TcpSink()
    sink.start()
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
            elif text.startswith("VMCTL-EXIT"):
                # Done. Not every VMM exits on the guest's reboot (microvm without an i8042
                # falls back to a BIOS restart), so stop it here.
                threading.Timer(10, process.kill).start()
        timer.cancel()
        returncode = process.wait()
    elapsed = time.monotonic() - started
    sink.join(timeout=5)
    sink.server.close()
    if sink.seconds:
        values["host_tcp_guest_to_host"] = round(sink.received / 1e6 / sink.seconds, 1)
    if len(values) < 8:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{command[0]}: only {sorted(values)} measured (exit {returncode}):\n{tail}")
    values["wall_seconds"] = round(elapsed, 1)
    return values


def vmctl_command(kernel: Path, initrd: Path, disk: Path) -> list[str]:
    exe = shutil.which("vmctl", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return [exe, "boot", "--kernel", str(kernel), "--initrd", str(initrd), "--disk", str(disk), "--net", "isolated",
            "--memory", "256M", "--no-input", "--timeout", "600",
            "--cmdline", "console=ttyS0 reboot=k panic=1 rdinit=/init"]


def qemu_command(kernel: Path, initrd: Path, disk: Path) -> list[str]:
    host, guest = QEMU_NET
    return ["qemu-system-x86_64", "-M", "microvm,accel=kvm,acpi=off", "-cpu", "host", "-m", "256M", "-smp", "1",
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", f"console=ttyS0 reboot=k panic=1 rdinit=/init ip={guest}::{host}:255.255.255.252::eth0:off",
            "-drive", f"id=d0,file={disk},format=raw,if=none", "-device", "virtio-blk-device,drive=d0",
            "-netdev", f"tap,id=n0,ifname={QEMU_TAP},script=no,downscript=no,vhost=off",
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


def measure(kernel: Path, runs: int, logs: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="vmctl-virtio-bench-") as temp:
        work = Path(temp)
        initrd = build_initramfs(work)
        disk = work / "disk.raw"
        with open(disk, "wb") as file:
            file.write(os.urandom(1 << 20) * DISK_MIB)  # allocated, so reads hit real blocks
        result: dict = {"config": {"disk_mib": DISK_MIB, "seq_mib": SEQ_MIB, "randread_seconds": RANDREAD_SECONDS,
                                   "tcp_mib": TCP_MIB, "runs": runs, "kernel": str(kernel),
                                   "host": os.uname().release}}
        result["vmctl"] = [run_guest(vmctl_command(kernel, initrd, disk), 900, logs / f"vmctl-{i}.log")
                           for i in range(runs)]
        if shutil.which("qemu-system-x86_64"):
            result["qemu"] = [with_qemu_tap(lambda: run_guest(qemu_command(kernel, initrd, disk), 900,
                                                                logs / f"qemu-{i}.log"))
                              for i in range(runs)]
        return result


def summary(result: dict) -> str:
    keys = [("seqwrite_1m", "MB/s"), ("seqread_1m", "MB/s"), ("randread_4k", "IOPS"), ("tcp_guest_to_host", "MB/s")]
    lines = ["| test | clock | vmctl | QEMU microvm | vmctl / QEMU |", "|---|---|---|---|---|"]
    for key, unit in keys:
        for clock in ("host", "guest"):
            name = f"{clock}_{key}"
            ours = max(row[name] for row in result["vmctl"])
            theirs = max(row[name] for row in result["qemu"]) if "qemu" in result else None
            ratio = f"{ours / theirs:.2f}x" if theirs else "-"
            lines.append(f"| {key} ({unit}) | {clock} | {ours:g} | {theirs if theirs is not None else '-'} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmctl.virtio.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", type=Path, required=True, help="guest kernel with virtio-mmio cmdline devices")
    parser.add_argument("--runs", type=int, default=3, help="runs per VMM; the best is reported (default 3)")
    parser.add_argument("--output", type=Path, help="write the raw results as JSON")
    parser.add_argument("--nested", action="store_true", help="run inside the nested host")
    parser.add_argument("--insmod", type=Path, action="append", default=[],
                        help="kernel module to load first (tun.ko when the host kernel lacks /dev/net/tun)")
    args = parser.parse_args(argv)
    if args.nested:
        inner = [sys.executable, "-m", "vmctl.virtio.bench", "--kernel", str(args.kernel.resolve()),
                 "--runs", str(args.runs), *[f"--insmod={m.resolve()}" for m in args.insmod]]
        shares = []
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            inner += ["--output", str(args.output.resolve())]
            shares = ["--share", str(args.output.resolve().parent)]
        return subprocess.run([sys.executable, "-m", "vmctl.nested", "--timeout", "3000", *shares, "--", *inner]).returncode
    for module in args.insmod:
        subprocess.run(["insmod", str(module)], check=False)
    if not os.path.exists("/dev/net/tun") and os.path.exists("/sys/class/misc/tun"):
        os.makedirs("/dev/net", exist_ok=True)
        os.mknod("/dev/net/tun", 0o600 | 0o020000, os.makedev(10, 200))
    logs = args.output.parent if args.output else Path(tempfile.gettempdir())
    result = measure(args.kernel, args.runs, logs)
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
