"""Host folders in guests: vmctl's virtio-fs vs QEMU's virtio-9p vs the host itself; and `vmctl cp`.

    python benchmarks/mounts.py --nested     # here (kvm_pvm): everything inside the nested host
    python benchmarks/mounts.py              # on a host whose /dev/kvm is hardware-backed

One folder holds a source tree (a copy of vmctl's own `vmctl/`, `docs/` and `tests/`, copied
N times). The same guest (reference kernel, an initramfs with static busybox, 1 vCPU,
256 MiB) mounts it through vmctl's virtio-fs (`vmctl boot --fs`) and, in QEMU microvm,
through virtio-9p (`-fsdev local`, `trans=virtio,version=9p2000.L,msize=512K`, cache=none and
cache=loose); the host runs the same busybox commands on the folder directly. Workloads:
- `walk_read_sum`: `find | xargs md5sum` over the tree, first time (cold in the guest) and
  again (`cached`: the guest's page cache);
- `small_files`: create 500 files of 1 KiB, then delete them.
Times are on the host's clock, between the guest's MARK and BENCH console lines.
Then `vmctl cp` into and out of a running guest (busybox image, no network: the tar stream
goes through the transfer share), a 32 MiB file, in MB/s.

Writes benchmarks/results/mounts.json and prints a table (ratios vs the host). Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from vmctl.images import locate  # noqa: E402

RESULTS = HERE / "results" / "mounts.json"
SMALL_FILES = 500
CP_MIB = 32
BENCH_LINE = re.compile(r"^BENCH (\S+)")
WORKLOADS = ["walk_read_sum", "walk_read_sum_cached", "small_files"]

# the guest's workloads; MOUNT is filled in per transport
SCRIPT = """
cd /mnt/share
echo MARK; find tree -type f | xargs md5sum > /tmp/sums; echo BENCH walk_read_sum $(wc -l < /tmp/sums)
echo MARK; find tree -type f | xargs md5sum > /tmp/sums2; echo BENCH walk_read_sum_cached $(wc -l < /tmp/sums2)
cmp /tmp/sums /tmp/sums2 || echo CHECKSUMS-DIFFER
echo MARK; mkdir -p w; i=0; while [ $i -lt %(n)d ]; do echo 0123456789abcdef0123456789abcdef > w/f$i; i=$((i+1)); done; rm -r w; echo BENCH small_files %(n)d
""" % {"n": SMALL_FILES}

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /mnt/share
for word in $(cat /proc/cmdline); do case $word in share=*) SHARE=${word#share=} ;; esac; done
case $SHARE in
  virtiofs) mount -t virtiofs share /mnt/share ;;
  9p-none) mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=none share /mnt/share ;;
  9p-loose) mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=loose share /mnt/share ;;
esac || echo MOUNT-FAILED
sh /script
echo VMCTL-EXIT 0
reboot -f
"""


def progress(message: str) -> None:
    print(f"[mounts-bench] {message}", file=sys.stderr, flush=True)


def build_initramfs(work: Path) -> Path:
    root = work / "root"
    for folder in ("bin", "proc", "sys", "dev", "tmp", "mnt"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    if busybox is None:
        raise SystemExit("a static busybox is needed (Debian: busybox-static)")
    shutil.copy(busybox, root / "bin/busybox")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    (root / "script").write_text(SCRIPT)
    archive = work / "initramfs.cpio"
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    with open(archive, "wb") as out:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, stdout=out, check=True)
    return archive


def make_tree(folder: Path, copies: int) -> tuple[int, int]:
    tree = folder / "tree"
    for index in range(copies):
        for part in ("vmctl", "docs", "tests"):
            shutil.copytree(REPO / part, tree / str(index) / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    files = [p for p in tree.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def run_guest(command: list[str], timeout: float, log: Path) -> dict[str, float]:
    values: dict[str, float] = {}
    mark = time.monotonic()
    with open(log, "w") as out, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                  stdin=subprocess.DEVNULL, text=True, errors="replace") as process:
        timer = threading.Timer(timeout, process.kill)
        timer.start()
        for line in process.stdout:
            now = time.monotonic()
            out.write(line)
            text = line.strip()
            if text == "MARK":
                mark = now
            elif match := BENCH_LINE.match(text):
                values[match.group(1)] = round(now - mark, 3)
            elif text in ("MOUNT-FAILED", "CHECKSUMS-DIFFER"):
                process.kill()
                raise SystemExit(f"{command[0]}: {text} (see {log})")
            elif text.startswith("VMCTL-EXIT"):
                threading.Timer(10, process.kill).start()
        timer.cancel()
        process.wait()
    if set(values) != set(WORKLOADS):
        raise SystemExit(f"{command[0]}: only {sorted(values)} measured (see {log})")
    return values


def vmctl_command(kernel: Path, initrd: Path, share: Path) -> list[str]:
    return [sys.executable, "-m", "vmctl", "boot", "--kernel", str(kernel), "--initrd", str(initrd),
            "--fs", f"{share},tag=share", "--cpus", "1", "--memory", "256M", "--no-input", "--timeout", "1200",
            "--cmdline", "console=ttyS0 reboot=k panic=1 rdinit=/init share=virtiofs"]


def qemu_command(kernel: Path, initrd: Path, share: Path, cache: str) -> list[str]:
    return ["qemu-system-x86_64", "-M", "microvm,accel=kvm,acpi=off", "-cpu", "host", "-m", "256M", "-smp", "1",
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", f"console=ttyS0 reboot=k panic=1 rdinit=/init share=9p-{cache}",
            "-fsdev", f"local,id=f0,path={share},security_model=passthrough",
            "-device", "virtio-9p-device,fsdev=f0,mount_tag=share"]


def host_run(share: Path) -> dict[str, float]:
    """The same busybox commands on the folder itself (the host's page cache is warm after the
    guests' runs, so both host numbers are cached ones)."""
    busybox = shutil.which("busybox")
    values: dict[str, float] = {}
    mark = time.monotonic()
    script = SCRIPT.replace("/mnt/share", str(share)).replace("/tmp/sums", str(share.parent / "sums"))
    process = subprocess.Popen([busybox, "sh", "-c", script], stdout=subprocess.PIPE, text=True,
                               env={"PATH": str(Path(busybox).parent) + ":/usr/bin:/bin"})
    for line in process.stdout:
        now = time.monotonic()
        if line.strip() == "MARK":
            mark = now
        elif match := BENCH_LINE.match(line.strip()):
            values[match.group(1)] = round(now - mark, 3)
    process.wait()
    return values


def cp_throughput(work: Path) -> dict[str, float]:
    """`vmctl cp` of a CP_MIB file into and out of a running busybox guest (no network)."""
    state = work / "state"
    env = dict(os.environ, VMCTL_STATE_DIR=str(state))
    vmctl = [sys.executable, "-m", "vmctl"]
    spec = work / "cp.yaml"
    spec.write_text("machines:\n  cp:\n    memory: 256M\n")
    payload = work / "payload.bin"
    payload.write_bytes(os.urandom(CP_MIB << 20))
    subprocess.run([*vmctl, "up", str(spec)], env=env, check=True, capture_output=True)
    try:
        started = time.monotonic()
        subprocess.run([*vmctl, "cp", str(payload), "cp:/tmp/payload.bin"], env=env, check=True, capture_output=True)
        into = time.monotonic() - started
        started = time.monotonic()
        subprocess.run([*vmctl, "cp", "cp:/tmp/payload.bin", str(work / "back.bin")], env=env, check=True, capture_output=True)
        out = time.monotonic() - started
        if (work / "back.bin").read_bytes() != payload.read_bytes():
            raise SystemExit("vmctl cp: the file came back different")
        started = time.monotonic()
        subprocess.run([*vmctl, "exec", "cp", "--", "true"], env=env, check=True, capture_output=True)
        exec_seconds = time.monotonic() - started
    finally:
        subprocess.run([*vmctl, "rm", "cp"], env=env, capture_output=True)
    return {"into_guest_mb_s": round(CP_MIB * 1.048576 / into, 1), "out_of_guest_mb_s": round(CP_MIB * 1.048576 / out, 1),
            "exec_true_seconds": round(exec_seconds, 2), "mib": CP_MIB}


def measure(kernel: Path, copies: int, logs: Path | None, skip_cp: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="vmctl-mounts-bench-") as temp:
        work = Path(temp)
        logs = logs or work
        share = work / "share"
        share.mkdir()
        files, size = make_tree(share, copies)
        initrd = build_initramfs(work)
        result: dict = {"config": {"files": files, "bytes": size, "small_files": SMALL_FILES, "kernel": str(kernel),
                                   "guest": "1 vCPU, 256 MiB", "host_kernel": platform.release(),
                                   "nested": os.environ.get("VMCTL_NESTED") == "1", "date": time.strftime("%Y-%m-%d"),
                                   "note": "shared, noisy machine: compare ratios from one run, not absolute times"}}
        progress(f"tree: {files} files, {size >> 20} MiB")
        progress("vmctl virtio-fs")
        result["vmctl_virtiofs"] = run_guest(vmctl_command(kernel, initrd, share), 1500, logs / "vmctl.log")
        for cache in ("none", "loose"):
            progress(f"qemu 9p cache={cache}")
            result[f"qemu_9p_{cache}"] = run_guest(qemu_command(kernel, initrd, share, cache), 1500, logs / f"qemu-9p-{cache}.log")
        progress("host")
        result["host"] = host_run(share)
        if not skip_cp:
            progress("vmctl cp")
            result["cp"] = cp_throughput(work)
        return result


def summary(result: dict) -> str:
    columns = ["vmctl_virtiofs", "qemu_9p_none", "qemu_9p_loose", "host"]
    lines = ["| workload (s) | " + " | ".join(columns) + " | virtiofs / host | virtiofs / 9p (none) | virtiofs / 9p (loose) |",
             "|---" * (len(columns) + 4) + "|"]
    for workload in WORKLOADS:
        row = [result[c][workload] for c in columns]
        ours, nine_none, nine_loose, host = row
        lines.append(f"| {workload} | " + " | ".join(f"{v:g}" for v in row)
                     + f" | {ours / host:.1f}x | {ours / nine_none:.2f}x | {ours / nine_loose:.2f}x |")
    if "cp" in result:
        cp = result["cp"]
        lines.append(f"\nvmctl cp {cp['mib']} MiB: into the guest {cp['into_guest_mb_s']} MB/s, out {cp['out_of_guest_mb_s']} MB/s; "
                     f"`vmctl exec -- true` {cp['exec_true_seconds']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--kernel", type=Path, help="guest kernel (default: the reference bzImage)")
    parser.add_argument("--copies", type=int, default=1, help="copies of the source tree (default 1)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--nested", action="store_true", help="run inside the nested host (paravirtual-KVM hosts)")
    parser.add_argument("--memory", type=int, default=3072, help="nested host memory in MiB (default 3072)")
    parser.add_argument("--logs", type=Path, help="keep each guest's console log in this directory")
    parser.add_argument("--skip-cp", action="store_true", help="only the mount workloads")
    args = parser.parse_args(argv)
    kernel = (args.kernel or locate().bzimage).resolve()
    if not kernel.exists():
        raise SystemExit(f"{kernel}: no such kernel (run `vmctl image build`)")
    output = args.output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.nested:
        inner = [sys.executable, str(Path(__file__).resolve()), "--kernel", str(kernel), "--copies", str(args.copies),
                 "--output", str(output), *(["--skip-cp"] if args.skip_cp else [])]
        shares = ["--share", str(output.parent)]
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            inner += ["--logs", str(args.logs.resolve())]
            shares += ["--share", str(args.logs.resolve())]
        return subprocess.run([sys.executable, "-m", "vmctl.nested", "--timeout", "3000", "--memory", str(args.memory),
                               *shares, "--", *inner], cwd=REPO).returncode
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    result = measure(kernel, args.copies, args.logs, args.skip_cp)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    progress(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
