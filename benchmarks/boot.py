"""Boot latency and idle memory: vmctl's native VMM vs QEMU microvm, same kernel and initramfs.

Measures, N times each, the wall time from starting the VMM process to the guest's userspace
marker line (VMCTL-READY, printed by the reference initramfs's /init), and the VMM's resident
memory while the guest idles at its shell. Needs hardware-backed KVM: on a host whose KVM is
paravirtual (kvm_pvm), run it inside the nested host:

    python benchmarks/boot.py --nested        # re-runs itself inside the nested host
    python benchmarks/boot.py --runs 10       # here, when /dev/kvm is hardware-backed

Writes benchmarks/results/boot.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from vmctl.hostcheck import check_host  # noqa: E402

READY = b"VMCTL-READY"
CMDLINE = "console=ttyS0 reboot=k panic=-1 quiet"


@dataclass
class Sample:
    ready_seconds: float
    idle_rss_kib: int | None


def vmctl_command(kernel: Path, initrd: Path) -> list[str]:
    return [sys.executable, "-m", "vmctl", "boot", "--kernel", str(kernel), "--initrd", str(initrd),
            "--memory", "256M", "--cpus", "1", "--cmdline", CMDLINE, "--no-input"]


def qemu_command(kernel: Path, initrd: Path) -> list[str]:
    return ["qemu-system-x86_64", "-M", "microvm,accel=kvm,acpi=off", "-cpu", "host", "-m", "256M", "-smp", "1",
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", CMDLINE]


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(command: list[str], timeout: float, settle: float) -> Sample:
    """Start the VMM, wait for READY on its console, let the guest idle, read RSS, kill."""
    start = time.monotonic()
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        seen = b""
        while READY not in seen:
            chunk = process.stdout.read1(4096) if hasattr(process.stdout, "read1") else process.stdout.read(1)
            if not chunk:
                raise RuntimeError(f"{command[0]} ended before the guest was ready: {seen[-500:]!r}")
            seen += chunk
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"no {READY.decode()} within {timeout} s")
        ready = time.monotonic() - start
        time.sleep(settle)
        return Sample(ready, rss_kib(process.pid))
    finally:
        process.kill()
        process.wait()


def summarize(samples: list[Sample]) -> dict:
    ready = [s.ready_seconds for s in samples]
    rss = [s.idle_rss_kib for s in samples if s.idle_rss_kib is not None]
    return {
        "runs": len(samples),
        "ready_median_ms": round(statistics.median(ready) * 1000, 1),
        "ready_min_ms": round(min(ready) * 1000, 1),
        "ready_max_ms": round(max(ready) * 1000, 1),
        "idle_rss_median_mib": round(statistics.median(rss) / 1024, 1) if rss else None,
        "samples": [asdict(s) for s in samples],
    }


def table(result: dict) -> str:
    ours, qemu = result["vmctl"], result.get("qemu")
    rows = ["| VMM | runs | boot to userspace, median (min–max) | idle VMM RSS |", "|---|---|---|---|"]
    for name, r in (("vmctl (native)", ours), ("QEMU microvm", qemu)):
        if r:
            rows.append(f"| {name} | {r['runs']} | {r['ready_median_ms']} ms ({r['ready_min_ms']}–{r['ready_max_ms']}) | {r['idle_rss_median_mib']} MiB |")
    if qemu:
        rows.append("")
        rows.append(f"vmctl / QEMU boot time ratio: **{ours['ready_median_ms'] / qemu['ready_median_ms']:.2f}x**; "
                    f"RSS ratio: **{ours['idle_rss_median_mib'] / qemu['idle_rss_median_mib']:.2f}x**.")
    rows.append(f"Environment: {result['environment']}.")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--kernel", type=Path, help="bzImage (default: the reference kernel)")
    parser.add_argument("--initrd", type=Path, help="initramfs (default: the reference initramfs)")
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--settle", type=float, default=1.0, help="idle seconds before reading RSS")
    parser.add_argument("--nested", action="store_true", help="run inside the nested host (for paravirtual KVM hosts)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "boot.json")
    args = parser.parse_args()

    if args.kernel is None or args.initrd is None:
        from vmctl.images import locate

        found = locate()
        args.kernel = args.kernel or found.bzimage
        args.initrd = args.initrd or found.initramfs

    if args.nested:
        from vmctl.nested import run_in_nested_host

        inner = [sys.executable, str(Path(__file__).resolve()), "--runs", str(args.runs), "--kernel", str(args.kernel),
                 "--initrd", str(args.initrd), "--output", str(args.output.resolve())]
        return run_in_nested_host(inner)

    report = check_host()
    if not report.boots_linux:
        print("this host's /dev/kvm cannot boot Linux (see `vmctl host-check`): use --nested", file=sys.stderr)
        return 2
    environment = f"{platform.node()}, KVM {report.kvm_module}, {os.cpu_count()} CPUs, kernel {args.kernel.name}"
    if Path("/sys/module/kvm_amd").exists() and "nested" in platform.release():
        environment += " (nested)"
    result: dict = {"environment": environment, "kvm_module": report.kvm_module, "cmdline": CMDLINE}
    result["vmctl"] = summarize([measure(vmctl_command(args.kernel, args.initrd), args.timeout, args.settle) for _ in range(args.runs)])
    if shutil.which("qemu-system-x86_64"):
        result["qemu"] = summarize([measure(qemu_command(args.kernel, args.initrd), args.timeout, args.settle) for _ in range(args.runs)])
        result["ratio_boot"] = result["vmctl"]["ready_median_ms"] / result["qemu"]["ready_median_ms"]
        result["ratio_rss"] = result["vmctl"]["idle_rss_median_mib"] / result["qemu"]["idle_rss_median_mib"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
