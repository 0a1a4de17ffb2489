"""Boot to userspace and idle memory: vmctl's native VMM vs QEMU microvm, same kernel + initramfs.

For each VMM, N times (alternating, so load changes hit both alike), vmctl twice: as a new
interpreter per boot ("vmctl", cold) and forked by a pre-initialised launcher that has
already imported the VMM ("vmctl+launcher", vmctl.launcher; started once before the runs,
the client is still a new `vmctl` process):
  boot   wall time from starting the VMM process (`vmctl boot …` / `qemu-system-x86_64 -M
         microvm -accel kvm …`) to the guest's userspace marker VMCTL-READY on the serial
         console (printed by the reference initramfs's /init just before its command runs)
  idle   the guest's command is `sleep IDLE`; halfway through, the VMM process's VmRSS
         (/proc/PID/status) and Pss (/proc/PID/smaps_rollup) are sampled, and its smaps
         split into the guest-RAM mapping and the rest: the VMM's own overhead
         (RSS minus the guest RAM it touched, vmctl.procmem)
  exits  when /sys/kernel/debug/kvm is there: KVM's exit counters (all VMs of this host,
         nothing else runs a VM here) before start, at VMCTL-READY and after the VM ended
Same guest for both: the reference bzImage and busybox initramfs, 1 vCPU, 256 MiB,
`console=ttyS0 quiet` (reboot=k for vmctl, reboot=t for QEMU's microvm, which has no i8042).

Needs hardware-backed KVM. On a host whose KVM cannot boot Linux (kvm_pvm) the whole
benchmark runs inside ONE nested host (L1 under QEMU TCG with emulated AMD-V), both VMMs
there: absolute times are inflated ~13x and more, only the ratios mean something.

    python benchmarks/boot.py                  # here if KVM is hardware-backed, else nested
    python benchmarks/boot.py --runs 5 --nested

Writes benchmarks/results/boot.json and prints a markdown table (docs/benchmarks-boot.md).
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fresh_bytecode import compile_vmctl  # noqa: E402
from publish import publish  # noqa: E402

from vmctl.launcher.session import PrivateLauncher  # noqa: E402
from vmctl.procmem import vmm_memory  # noqa: E402

READY = "VMCTL-READY"
GUEST_MEMORY = 256 << 20  # both VMMs' guests: --memory 256M / -m 256M
KVM_STATS = Path("/sys/kernel/debug/kvm")
# KVM's debugfs counters worth reading: all exits, and those that reached the VMM process.
EXIT_COUNTERS = ("exits", "io_exits", "mmio_exits", "halt_exits", "irq_exits", "signal_exits")


def progress(message: str) -> None:
    print(f"[boot-bench] {message}", file=sys.stderr, flush=True)


@dataclass
class Sample:
    ready_seconds: float
    total_seconds: float
    rss_kib: int | None
    pss_kib: int | None
    guest_rss_kib: int | None = None  # resident pages of the guest-RAM mapping
    overhead_rss_kib: int | None = None  # RSS minus guest RAM: the VMM's own memory
    overhead_pss_kib: int | None = None
    exits_to_ready: dict[str, int] = field(default_factory=dict)
    exits_total: dict[str, int] = field(default_factory=dict)


def guest_cmdline(reboot: str, idle: float) -> str:
    script = base64.b64encode(f"sleep {idle}".encode()).decode()
    return f"console=ttyS0 reboot={reboot} panic=1 quiet vmctl.cmd={script}"


def vmctl_command(kernel: Path, initrd: Path, idle: float) -> list[str]:
    exe = shutil.which("vmctl", path=os.path.dirname(sys.executable)) or "vmctl"
    return [exe, "boot", "--kernel", str(kernel), "--initrd", str(initrd), "--memory", "256M", "--cpus", "1",
            "--no-input", "--cmdline", guest_cmdline("k", idle)]


def qemu_command(kernel: Path, initrd: Path, idle: float) -> list[str]:
    return ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host", "-m", "256M",
            "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", guest_cmdline("t", idle)]


def status_kib(pid: int, file: str, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def kvm_counters() -> dict[str, int]:
    counters = {}
    for name in EXIT_COUNTERS:
        try:
            counters[name] = int((KVM_STATS / name).read_text())
        except (OSError, ValueError):
            pass
    return counters


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in after if name in before}


class Launcher(PrivateLauncher):
    """A vmctl launcher for the "vmctl+launcher" runs; stopped at the end."""

    def vmm_pid(self, _client: subprocess.Popen) -> int | None:
        """The VMM is the launcher's child (the process started is only its client)."""
        children = self.children()
        return children[0] if len(children) == 1 else None


def measure(command: list[str], idle: float, timeout: float, env: dict[str, str] | None = None,
            vmm_pid=lambda process: process.pid) -> Sample:
    """Start the VMM, time VMCTL-READY, sample memory mid-idle, wait for a clean end.
    `vmm_pid(process)` names the process whose memory is the VMM's."""
    lines: list[str] = []
    ready = threading.Event()
    counters_start = kvm_counters()
    start = time.monotonic()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace", env=env)
    ready_at: list[float] = []
    counters_ready: list[dict[str, int]] = []

    def reader() -> None:
        for line in process.stdout:
            if not ready.is_set() and READY in line:
                ready_at.append(time.monotonic())
                counters_ready.append(kvm_counters())
                ready.set()
            lines.append(line.rstrip("\r\n"))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        if not ready.wait(timeout):
            raise RuntimeError(f"{command[0]}: no {READY} within {timeout} s:\n" + "\n".join(lines[-20:]))
        time.sleep(idle / 2)
        pid = vmm_pid(process) or process.pid
        rss = status_kib(pid, "status", "VmRSS")
        pss = status_kib(pid, "smaps_rollup", "Pss")
        use = vmm_memory(pid, GUEST_MEMORY)
        returncode = process.wait(timeout=idle + timeout)
        end = time.monotonic()
        thread.join(timeout=10)
    finally:
        if process.poll() is None:  # never leave a VMM behind
            process.kill()
            process.wait()
    if returncode != 0 or not any(line.strip() == "VMCTL-EXIT 0" for line in lines):
        raise RuntimeError(f"{command[0]}: guest did not end cleanly (exit {returncode}):\n" + "\n".join(lines[-20:]))
    return Sample(ready_at[0] - start, end - start, rss, pss,
                  use.guest_rss_kib if use else None, use.overhead_rss_kib if use else None,
                  use.overhead_pss_kib if use else None,
                  exits_to_ready=delta(counters_ready[0], counters_start),
                  exits_total=delta(kvm_counters(), counters_start))


def summarize(samples: list[Sample]) -> dict:
    def median(values: list) -> float | None:
        values = [value for value in values if value is not None]
        return statistics.median(values) if values else None

    def mib(kib: float | None) -> float | None:
        return None if kib is None else round(kib / 1024, 1)

    ready = [s.ready_seconds for s in samples]
    out = {
        "runs": len(samples),
        "ready_median_ms": round(median(ready) * 1000, 1),
        "ready_min_ms": round(min(ready) * 1000, 1),
        "ready_max_ms": round(max(ready) * 1000, 1),
        "rss_median_mib": round(median([s.rss_kib for s in samples]) / 1024, 1),
        "pss_median_mib": round(median([s.pss_kib for s in samples]) / 1024, 1),
        "guest_rss_median_mib": mib(median([s.guest_rss_kib for s in samples])),
        "overhead_rss_median_mib": mib(median([s.overhead_rss_kib for s in samples])),
        "overhead_pss_median_mib": mib(median([s.overhead_pss_kib for s in samples])),
        "samples": [asdict(s) for s in samples],
    }
    if samples[0].exits_to_ready:
        out["exits_to_ready_median"] = {name: int(median([s.exits_to_ready.get(name) for s in samples]))
                                        for name in samples[0].exits_to_ready}
    return out


def table(result: dict) -> str:
    ours, qemu = result["vmctl"], result["qemu"]
    rows = ["| VMM | runs | start → VMCTL-READY, median (min–max) | idle VmRSS | idle Pss "
            "| guest RAM touched | VMM overhead (RSS − guest) |", "|---|---|---|---|---|---|---|"]
    variants = [("vmctl boot (native VMM)", ours)]
    if "vmctl_launcher" in result:
        variants.append(("vmctl boot via the launcher", result["vmctl_launcher"]))
    for name, r in variants + [("QEMU microvm", qemu)]:
        rows.append(f"| {name} | {r['runs']} | {r['ready_median_ms'] / 1000:.2f} s "
                    f"({r['ready_min_ms'] / 1000:.2f}–{r['ready_max_ms'] / 1000:.2f}) | "
                    f"{r['rss_median_mib']} MiB | {r['pss_median_mib']} MiB | "
                    f"{r.get('guest_rss_median_mib')} MiB | {r.get('overhead_rss_median_mib')} MiB |")
    overhead = f"**{result['ratio_overhead']:.2f}x**" if result.get("ratio_overhead") else "–"
    rows.append(f"| **vmctl / QEMU** | | **{result['ratio_boot']:.2f}x** | **{result['ratio_rss']:.2f}x** | "
                f"**{result['ratio_pss']:.2f}x** | | {overhead} |")
    if "ratio_boot_launcher" in result:
        overhead = f"**{result['ratio_overhead_launcher']:.2f}x**" if result.get("ratio_overhead_launcher") else "–"
        rows.append(f"| **vmctl via the launcher / QEMU** | | **{result['ratio_boot_launcher']:.2f}x** | "
                    f"**{result['ratio_rss_launcher']:.2f}x** | **{result['ratio_pss_launcher']:.2f}x** | | {overhead} |")
    if "exits_to_ready_median" in ours:
        rows += ["", "| KVM exits, start → VMCTL-READY (median) | " + " | ".join(EXIT_COUNTERS) + " |",
                 "|---|" + "---|" * len(EXIT_COUNTERS)]
        for name, r in (("vmctl", ours), ("QEMU", qemu)):
            rows.append(f"| {name} | " + " | ".join(str(r["exits_to_ready_median"].get(c, "–")) for c in EXIT_COUNTERS) + " |")
    if "breakdown" in result:
        floors = {name: entry.get("startup_floor_ms") for name, entry in result["breakdown"].items()
                  if name != "floor_parts"}
        rows += ["", "Start-up floors (process start → failing on a missing kernel, median): "
                 + ", ".join(f"{name} {ms / 1000:.2f} s" for name, ms in floors.items() if ms is not None) + "."]
        parts = result["breakdown"].get("floor_parts", {})
        if parts:
            rows += ["", "Parts of vmctl's floor (median): " + "; ".join(f"{label} {ms / 1000:.2f} s"
                                                                     for label, ms in parts.items()) + "."]
    rows += ["", f"Environment: {result['environment']}."]
    return "\n".join(rows)


TRACING = Path("/sys/kernel/debug/tracing/events/kvm")
# AMD SVM exit codes (arch/x86/include/uapi/asm/svm.h) for the ones a booting guest makes;
# the nested host's L1 is AMD-V. Others are shown in hex.
SVM_EXITS = {0x018: "write_cr8", 0x060: "intr", 0x061: "nmi", 0x064: "vintr", 0x06e: "rdtsc", 0x072: "cpuid",
             0x077: "pause", 0x078: "hlt", 0x079: "invlpg", 0x07b: "ioio", 0x07c: "msr", 0x07f: "shutdown",
             0x081: "vmmcall", 0x087: "rdtscp", 0x08d: "xsetbv", 0x400: "npf"}


class ExitHistogram:
    """KVM's kvm_exit (by exit reason) and kvm_pio (by port) tracepoints counted in-kernel
    with hist triggers, for one VM's life; nothing is copied to user space per event."""

    TRIGGERS = (("kvm_exit", "exit_reason"), ("kvm_pio", "port"), ("kvm_msr", "ecx"))

    def __enter__(self) -> "ExitHistogram":
        for event, key in self.TRIGGERS:
            (TRACING / event / "trigger").write_text(f"hist:keys={key}:sort=hitcount.descending\n")
        return self

    def read(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for event, _key in self.TRIGGERS:
            counts: dict[str, int] = {}
            for line in (TRACING / event / "hist").read_text().splitlines():
                if line.startswith("{"):
                    value = int(line.split(":")[1].split("}")[0])
                    hits = int(line.rsplit("hitcount:", 1)[1])
                    name = SVM_EXITS.get(value, hex(value)) if event == "kvm_exit" else hex(value)
                    counts[name] = hits
            out[event] = counts
        return out

    def __exit__(self, *exc: object) -> None:
        for event, key in self.TRIGGERS:
            (TRACING / event / "trigger").write_text(f"!hist:keys={key}:sort=hitcount.descending\n")


def startup_floor(command: list[str], runs: int, env: dict[str, str] | None = None) -> float:
    """Median seconds for the VMM process to start, load itself and fail on a missing kernel:
    what every boot pays before the guest's first instruction."""
    missing = Path("/nonexistent/kernel")
    argv = [str(missing) if Path(arg).name in ("bzImage", "vmlinux") else arg for arg in command]
    times = []
    for _ in range(runs):
        start = time.monotonic()
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env)
        times.append(time.monotonic() - start)
    return statistics.median(times)


# What vmctl's start-up floor is made of: the same interpreter doing less and less.
FLOOR_PARTS = (
    ("python -S -c pass (interpreter, no site)", ["-S", "-c", "pass"]),
    ("python -c pass (interpreter + site, .pth files)", ["-c", "pass"]),
    ("+ import vmctl.cli (what a launcher client loads)", ["-c", "import vmctl.cli, vmctl.launcher.client"]),
    ("+ import the boot path (CLI, VMM, devices)", ["-c", "import vmctl.cli.boot, vmctl.vmm.machine, vmctl.boot.loader"]),
)


def floor_parts(runs: int = 3) -> dict[str, float]:
    """Median ms of each FLOOR_PARTS command (same interpreter as the VMM's)."""
    parts = {}
    for label, argv in FLOOR_PARTS:
        times = []
        for _ in range(runs):
            start = time.monotonic()
            subprocess.run([sys.executable, *argv], stdin=subprocess.DEVNULL, capture_output=True, check=True)
            times.append(time.monotonic() - start)
        parts[label] = round(statistics.median(times) * 1000, 1)
    return parts


def breakdown(args: argparse.Namespace, launcher: "Launcher | None") -> dict:
    """One more boot per VMM with exit histograms, and each VMM's start-up floor."""
    out: dict = {}
    if launcher is not None:
        command = vmctl_command(args.kernel, args.initrd, 1)
        out["vmctl_launcher"] = {"startup_floor_ms": round(startup_floor(command, 3, launcher.env()) * 1000, 1)}
    out["floor_parts"] = floor_parts()
    for name, build in (("vmctl", vmctl_command), ("qemu", qemu_command)):
        command = build(args.kernel, args.initrd, 1)
        entry: dict = {"startup_floor_ms": round(startup_floor(command, 3) * 1000, 1)}
        if (TRACING / "kvm_exit" / "trigger").exists():
            with ExitHistogram() as histogram:
                sample = measure(command, 1, args.timeout)
                entry |= histogram.read()  # READY plus 1 s of idle and the shutdown
            entry["ready_ms"] = round(sample.ready_seconds * 1000, 1)
        out[name] = entry
        progress(f"breakdown {name}: {entry.get('startup_floor_ms')} ms start-up floor, "
                 f"top exits {list(entry.get('kvm_exit', {}).items())[:5]}")
    return out


def ensure_debugfs() -> None:
    """KVM's exit counters live in debugfs; mount it if nobody has (root only; optional)."""
    if not KVM_STATS.exists() and os.geteuid() == 0 and Path("/sys/kernel/debug").is_dir():
        subprocess.run(["mount", "-t", "debugfs", "debugfs", "/sys/kernel/debug"], capture_output=True)


def qemu_version() -> str:
    result = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    return result.stdout.splitlines()[0] if result.returncode == 0 else "unknown"


def run_nested(args: argparse.Namespace) -> int:
    """The same command inside one nested host; results land in the shared results folder."""
    from vmctl.nested import NestedHost

    output = args.output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    inner = [sys.executable, str(Path(__file__).resolve()), "--here", "--runs", str(args.runs),
             "--kernel", str(args.kernel), "--initrd", str(args.initrd), "--idle", str(args.idle),
             "--timeout", str(args.timeout), "--output", str(output)] + (["--breakdown"] if args.breakdown else []) \
        + (["--no-launcher"] if args.no_launcher else [])
    host = NestedHost(memory_mib=args.memory, cpus=2, shares=[output.parent], progress=progress)
    budget = 3 * args.runs * (args.timeout + args.idle) + 300
    result = host.run(inner, cwd=str(HERE.parent), timeout=budget)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    progress(f"nested host: L1 boot {result.boot_seconds:.1f} s, benchmark {result.command_seconds:.1f} s")
    return result.exit_code


def run_all(args: argparse.Namespace, environment: str, nested: bool, kvm_module: str,
            launcher: Launcher | None) -> dict:
    variants = [("vmctl", vmctl_command, None, lambda process: process.pid)]
    if launcher is not None:
        variants.append(("vmctl_launcher", vmctl_command, launcher.env(), launcher.vmm_pid))
    variants.append(("qemu", qemu_command, None, lambda process: process.pid))
    samples: dict[str, list[Sample]] = {name: [] for name, *_ in variants}
    for index in range(args.runs):
        for name, build, env, vmm_pid in variants:
            sample = measure(build(args.kernel, args.initrd, args.idle), args.idle, args.timeout, env, vmm_pid)
            samples[name].append(sample)
            progress(f"run {index + 1}/{args.runs} {name}: READY after {sample.ready_seconds:.2f} s, "
                     f"RSS {sample.rss_kib} KiB, Pss {sample.pss_kib} KiB, overhead {sample.overhead_rss_kib} KiB")
    result: dict = {"environment": environment, "nested": nested, "kvm_module": kvm_module,
                    "cmdline": {"vmctl": guest_cmdline("k", args.idle), "qemu": guest_cmdline("t", args.idle)}}
    result |= {name: summarize(samples[name]) for name in samples}
    for name, suffix in (("vmctl", ""), ("vmctl_launcher", "_launcher")):
        if name not in result:
            continue
        ours, qemu = result[name], result["qemu"]
        result[f"ratio_boot{suffix}"] = round(ours["ready_median_ms"] / qemu["ready_median_ms"], 2)
        result[f"ratio_rss{suffix}"] = round(ours["rss_median_mib"] / qemu["rss_median_mib"], 2)
        result[f"ratio_pss{suffix}"] = round(ours["pss_median_mib"] / qemu["pss_median_mib"], 2)
        if ours["overhead_rss_median_mib"] and qemu["overhead_rss_median_mib"]:
            result[f"ratio_overhead{suffix}"] = round(ours["overhead_rss_median_mib"] / qemu["overhead_rss_median_mib"], 2)
    if args.breakdown:
        result["breakdown"] = breakdown(args, launcher)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="boots per VMM, alternating; medians reported (default 3)")
    parser.add_argument("--kernel", type=Path, help="kernel for both VMMs (default: the reference bzImage)")
    parser.add_argument("--initrd", type=Path, help="initramfs (default: the reference busybox initramfs)")
    parser.add_argument("--idle", type=float, default=5, help="seconds the guest idles (sleep) after READY (default 5)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed per boot (default 300)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--nested", action="store_true", help="run inside the nested host even if KVM here could boot Linux")
    where.add_argument("--here", action="store_true", help="run on this host's /dev/kvm, never nested")
    parser.add_argument("--breakdown", action="store_true", help="also: one boot per VMM with KVM exit histograms "
                        "(tracefs hist triggers, root) and each VMM's start-up floor")
    parser.add_argument("--memory", type=int, default=2048, help="nested host memory in MiB (default 2048)")
    parser.add_argument("--no-launcher", action="store_true", help="skip the vmctl-via-launcher runs")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "boot.json", help="JSON results")
    args = parser.parse_args()
    compile_vmctl()  # measure vmctl as installed (fresh bytecode), not a recompiling checkout

    from vmctl.host_probe import check_host
    from vmctl.images import locate

    images = locate()
    args.kernel = (args.kernel or images.bzimage).resolve()
    args.initrd = (args.initrd or images.initramfs).resolve()
    for path in (args.kernel, args.initrd):
        if not path.exists():
            print(f"boot.py: {path}: not found (run `vmctl image build`)", file=sys.stderr)
            return 2
    report = check_host()
    if args.nested or (not args.here and not report.boots_linux):
        progress(f"/dev/kvm here is {report.kvm_module}: running inside one nested host")
        return run_nested(args)
    if not report.boots_linux:
        print(f"boot.py: this host's /dev/kvm ({report.kvm_module}) cannot boot Linux: drop --here", file=sys.stderr)
        return 2
    if not shutil.which("qemu-system-x86_64"):
        print("boot.py: qemu-system-x86_64 not found (apt: qemu-system-x86)", file=sys.stderr)
        return 2
    ensure_debugfs()

    nested = os.environ.get("VMCTL_NESTED") == "1"
    environment = (f"KVM {report.kvm_module}{' inside the nested host (L1 under QEMU TCG)' if nested else ''}, "
                   f"{os.cpu_count()} CPUs, host kernel {platform.release()}, {qemu_version()}, "
                   f"guest: {args.kernel.name} + {args.initrd.name}, 1 vCPU, 256 MiB, {time.strftime('%Y-%m-%d')}")
    launcher = None if args.no_launcher else Launcher()
    try:
        result = run_all(args, environment, nested, report.kvm_module, launcher)
    finally:
        if launcher is not None:
            launcher.close()
    publish(result, args.output, table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
