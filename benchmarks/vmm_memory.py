"""What a VMM process costs in memory beyond its guest, on this host: vmctl vs QEMU.

Each VMM boots the same guest on this host's /dev/kvm and, SETTLE seconds after its start,
its /proc/PID/smaps is split (vmctl.procmem) into the guest-RAM mapping and the rest, and
the rest into file-backed pages (the interpreter or binary and its libraries: shared with
every process that maps the same files) and anonymous pages (heap, allocator arenas, thread
stacks, buffers). VMM overhead = RSS - guest RAM touched.

    linux          the reference bzImage + busybox initramfs, 256 MiB, 1 vCPU. On a
                   paravirtual-KVM host (kvm_pvm) a Linux guest only gets through its early
                   boot before the emulator stops it, which is enough here: both VMMs have
                   loaded the kernel and initramfs and are running the guest when sampled
                   (vmctl with VMCTL_TRY_LINUX_ON_PARAVIRT_KVM=1).
    tiny           vmctl only: tests/kvm/guests/forever.S (a few instructions, 256 MiB): the
                   VMM's floor with no kernel file loaded.
VMMs: vmctl as a new interpreter ("vmctl"), vmctl forked by a pre-initialised launcher
("vmctl_launcher", vmctl.launcher: read its Pss, since the pages it inherited are shared
with the launcher and every other launched VMM), QEMU (`qemu-system-x86_64 -M microvm
-accel kvm`), and with --baseline DIR vmctl run from another checkout (an A/B of a change
in the same command). Runs alternate; medians are reported.

    python benchmarks/vmm_memory.py [--runs 3] [--baseline /work/main]

Writes benchmarks/results/vmm_memory.json and prints a markdown table (docs/benchmarks-boot.md).
The same split inside the nested host, with the guest at userspace: benchmarks/boot.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fresh_bytecode import compile_vmctl  # noqa: E402
from publish import publish  # noqa: E402

from vmctl.launcher.session import PrivateLauncher  # noqa: E402
from vmctl.procmem import guest_region_sizes, is_guest_ram, parse_smaps, split_use  # noqa: E402

GUEST_MEMORY = 256 << 20
SLACK = 8 << 20  # procmem's default: both VMMs pad guest RAM for 2 MiB alignment
MIB = 1024.0
TINY_GUEST = HERE.parent / "tests" / "kvm" / "guests" / "forever.S"
CMDLINE = "console=ttyS0 quiet panic=1"
TRY_LINUX = {"VMCTL_TRY_LINUX_ON_PARAVIRT_KVM": "1"}


def progress(message: str) -> None:
    print(f"[vmm-memory] {message}", file=sys.stderr, flush=True)


def assemble_tiny(folder: Path) -> Path:
    """forever.S as a static ELF loaded at 1 MiB (as the kvm test tier builds it)."""
    obj, elf = folder / "forever.o", folder / "forever.elf"
    subprocess.run(["gcc", "-c", str(TINY_GUEST), "-o", str(obj)], check=True)
    subprocess.run(["ld", "-static", "-nostdlib", "-N", "--no-warn-rwx-segments", "-Ttext=0x100000", "-e", "_start",
                    str(obj), "-o", str(elf)], check=True)
    return elf


def vmctl_argv(python_prefix: list[str], kernel: Path, initrd: Path | None) -> list[str]:
    return [*python_prefix, "boot", "--kernel", str(kernel), *(["--initrd", str(initrd)] if initrd else []),
            "--memory", "256M", "--cmdline", CMDLINE, "--timeout", "120", "--quiet"]


def qemu_argv(kernel: Path, initrd: Path) -> list[str]:
    # -cpu host minus arch-capabilities: QEMU aborts on kvm_pvm setting MSR 0x10a otherwise.
    return ["qemu-system-x86_64", "-M", "microvm,accel=kvm,acpi=off", "-cpu", "host,-arch-capabilities",
            "-m", "256M", "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-serial", "null", "-kernel", str(kernel), "-initrd", str(initrd), "-append", CMDLINE]


def sample(argv: list[str], env: dict[str, str], settle: float,
           vmm_pid: Callable[[subprocess.Popen], int | None]) -> dict[str, float]:
    """Start the VMM, wait `settle` s, split its smaps, stop it. MiB."""
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        time.sleep(settle)
        pid = vmm_pid(process)
        if process.poll() is not None or pid is None:
            raise RuntimeError(f"{argv[0]} ended before it was sampled: {process.stderr.read().decode()[-500:]}")
        mappings = parse_smaps(Path(f"/proc/{pid}/smaps").read_text())
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    sizes = guest_region_sizes(GUEST_MEMORY)
    use = split_use(mappings, sizes, SLACK)
    rest = [m for m in mappings if not is_guest_ram(m, sizes, SLACK)]
    file_backed = sum(m.rss_kib for m in rest if m.name.startswith("/"))
    return {
        "rss": use.rss_kib / MIB, "pss": use.pss_kib / MIB, "guest": use.guest_rss_kib / MIB,
        "overhead_rss": use.overhead_rss_kib / MIB, "overhead_pss": use.overhead_pss_kib / MIB,
        "file_backed": file_backed / MIB,
        "anonymous": (use.overhead_rss_kib - file_backed) / MIB,
        "libpython": sum(m.rss_kib for m in rest if "libpython" in m.name) / MIB,
        "heap": sum(m.rss_kib for m in rest if m.name == "[heap]") / MIB,
    }


def medians(samples: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(s[key] for s in samples), 2) for key in samples[0]}


ROWS = (("vmctl", "vmctl boot, new interpreter"), ("vmctl_launcher", "vmctl boot via the launcher"),
        ("baseline", "vmctl boot, baseline checkout"), ("qemu", "QEMU microvm"),
        ("vmctl_tiny", "vmctl boot, tiny guest (no kernel file)"))


def table(result: dict) -> str:
    lines = ["| VMM (guest) | VMM overhead RSS | overhead Pss | file-backed | anonymous | of which [heap] "
             "| guest RAM touched | vs QEMU (RSS / Pss) |", "|---|---|---|---|---|---|---|---|"]
    qemu = result["medians"].get("qemu")
    for key, label in ROWS:
        row = result["medians"].get(key)
        if not row:
            continue
        guest = "linux" if key != "vmctl_tiny" else "tiny"
        ratio = (f"{row['overhead_rss'] / qemu['overhead_rss']:.2f}x / {row['overhead_pss'] / qemu['overhead_pss']:.2f}x"
                 if qemu and guest == "linux" else "–")
        lines.append(f"| {label} ({guest}) | {row['overhead_rss']:.1f} MiB | {row['overhead_pss']:.1f} MiB | "
                     f"{row['file_backed']:.1f} MiB | {row['anonymous']:.1f} MiB | {row['heap']:.1f} MiB | "
                     f"{row['guest']:.1f} MiB | {ratio} |")
    lines += ["", f"{result['runs']} runs each, alternating, medians, sampled {result['settle']:g} s after start; "
              f"{result['environment']}."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="samples per VMM, alternating (default 3)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds from start to sample (default 2)")
    parser.add_argument("--baseline", type=Path, help="also run vmctl from this checkout (A/B)")
    parser.add_argument("--no-qemu", action="store_true", help="leave QEMU out")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "vmm_memory.json")
    args = parser.parse_args()
    compile_vmctl()  # measure vmctl as installed (fresh bytecode), not a recompiling checkout

    from vmctl.images import locate

    images = locate()
    kernel, initrd = images.bzimage, images.initramfs
    for path in (kernel, initrd):
        if not path.exists():
            print(f"vmm_memory.py: {path}: not found (run `vmctl image build`)", file=sys.stderr)
            return 2
    vmctl = [str(Path(sys.executable).with_name("vmctl"))]
    env = {**os.environ, **TRY_LINUX}
    work = Path(tempfile.mkdtemp(prefix="vmctl-bench-mem-"))
    variants: list[tuple[str, list[str], dict[str, str], Callable[[subprocess.Popen], int | None]]] = [
        ("vmctl", vmctl_argv(vmctl, kernel, initrd), env, lambda p: p.pid),
        ("vmctl_tiny", vmctl_argv(vmctl, assemble_tiny(work), None), env, lambda p: p.pid),
    ]
    if args.baseline:
        import compileall

        compileall.compile_dir(str(args.baseline / "vmctl"), quiet=2)
        prefix = [sys.executable, "-P", "-c", "import sys; from vmctl.entry import main; sys.argv[0] = 'vmctl'; "
                  "sys.exit(main())"]
        variants.append(("baseline", vmctl_argv(prefix, kernel, initrd), {**env, "PYTHONPATH": str(args.baseline)},
                         lambda p: p.pid))
    if not args.no_qemu and shutil.which("qemu-system-x86_64"):
        variants.append(("qemu", qemu_argv(kernel, initrd), env, lambda p: p.pid))
    launcher = PrivateLauncher()
    try:
        def launched(_client: subprocess.Popen) -> int | None:
            children = launcher.children()
            return children[0] if len(children) == 1 else None

        variants.insert(1, ("vmctl_launcher", vmctl_argv(vmctl, kernel, initrd), {**launcher.env(), **TRY_LINUX},
                            launched))
        samples: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in variants}
        for index in range(args.runs):
            for name, argv, variant_env, pid_of in variants:
                samples[name].append(sample(argv, variant_env, args.settle, pid_of))
                progress(f"run {index + 1}/{args.runs} {name}: overhead {samples[name][-1]['overhead_rss']:.2f} MiB "
                         f"RSS, {samples[name][-1]['overhead_pss']:.2f} MiB Pss")
    finally:
        launcher.close()
        shutil.rmtree(work, ignore_errors=True)
    environment = (f"this host's /dev/kvm ({Path('/sys/module/kvm_pvm').exists() and 'kvm_pvm' or 'kvm'}), "
                   f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, kernel {platform.release()}, "
                   f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    result = {"environment": environment, "runs": args.runs, "settle": args.settle,
              "baseline": str(args.baseline) if args.baseline else None,
              "medians": {name: medians(rows) for name, rows in samples.items()}, "samples": samples}
    qemu = result["medians"].get("qemu")
    if qemu:
        for name in ("vmctl", "vmctl_launcher", "baseline"):
            if name in result["medians"]:
                ours = result["medians"][name]
                result[f"ratio_overhead_rss_{name}"] = round(ours["overhead_rss"] / qemu["overhead_rss"], 2)
                result[f"ratio_overhead_pss_{name}"] = round(ours["overhead_pss"] / qemu["overhead_pss"], 2)
    publish(result, args.output, table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
