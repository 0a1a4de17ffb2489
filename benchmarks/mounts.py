"""Host folders in guests: vmctl's virtio-fs vs QEMU's virtio-9p vs the host itself; and `vmctl cp`.

    python benchmarks/mounts.py --nested     # here (kvm_pvm): everything inside the nested host
    python benchmarks/mounts.py --nested --cp-only   # quick: cp/exec, agent over virtio vs UART
    python benchmarks/mounts.py              # on a host whose /dev/kvm is hardware-backed

One folder holds a source tree (a copy of vmctl's own `vmctl/`, `docs/` and `tests/`, copied
N times). The same guest (reference kernel, an initramfs with static busybox, 1 vCPU,
256 MiB) mounts it through vmctl's virtio-fs (`vmctl boot --fs`, `cache=auto` and `always`) and, in QEMU microvm,
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

from publish import publish  # noqa: E402

from vmctl.images import locate  # noqa: E402

RESULTS = HERE / "results" / "mounts.json"
SMALL_FILES = 500
CP_MIB = 32
BENCH_LINE = re.compile(r"^BENCH (\S+)")
WORKLOADS = ["walk_read_sum", "walk_read_sum_cached", "small_files"]
CACHE_MODES = ("auto", "always", "never")  # the share's `cache:` (docs/sharing.md)

# the guest's workloads; MOUNT is filled in per transport
SCRIPT = """
cd /mnt/share
echo MARK; find tree -type f | xargs md5sum > /tmp/sums; echo BENCH walk_read_sum $(wc -l < /tmp/sums)
echo MARK; find tree -type f | xargs md5sum > /tmp/sums2; echo BENCH walk_read_sum_cached $(wc -l < /tmp/sums2)
cmp /tmp/sums /tmp/sums2 || echo CHECKSUMS-DIFFER
if mkdir -p /mnt/share/w 2>/dev/null; then  # not on a read-only mount
echo MARK; i=0; while [ $i -lt %(n)d ]; do echo 0123456789abcdef0123456789abcdef > w/f$i; i=$((i+1)); done; rm -r w; echo BENCH small_files %(n)d
fi
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
  virtiofs-ro) mount -t virtiofs -o ro share /mnt/share ;;
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


def run_guest(command: list[str], timeout: float, log: Path, workloads: list[str] = WORKLOADS) -> dict[str, float | str]:
    """The workloads' seconds; a guest that stops early gives what it measured and an `error`
    (the other columns still run)."""
    values: dict[str, float | str] = {}
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
    if set(values) != set(workloads):
        values["error"] = f"the guest stopped after {sorted(values)} (exit {process.returncode}, see {log.name})"
        progress(f"{command[0]}: {values['error']}")
    return values


def vmctl_command(kernel: Path, initrd: Path, share: Path, cache: str = "auto", read_only: bool = False) -> list[str]:
    mode = "virtiofs-ro" if read_only else "virtiofs"
    return [sys.executable, "-m", "vmctl", "boot", "--kernel", str(kernel), "--initrd", str(initrd),
            "--fs", f"{share},tag=share,cache={cache}{',ro' if read_only else ''}", "--cpus", "1", "--memory", "256M", "--no-input", "--timeout", "1200",
            "--cmdline", f"console=ttyS0 reboot=k panic=1 rdinit=/init share={mode}"]


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


def host_fuse_run(share: Path, work: Path, cache: str, read_only: bool = False) -> dict[str, float]:
    """The same busybox commands on the host, through vmctl's file server mounted with the host
    kernel's FUSE client (`vmctl share mount --cache MODE`): the server's own cost, with no VM
    and no virtio in the way."""
    mountpoint = work / "fuse"
    mountpoint.mkdir()
    vmctl = [sys.executable, "-m", "vmctl"]
    subprocess.run([*vmctl, "share", "mount", "--detach", "--cache", cache, *(["--read-only"] if read_only else []),
                    str(share), str(mountpoint)], check=True, capture_output=True)
    try:
        values = host_run(mountpoint)
        if read_only:
            values.pop("small_files", None)  # the script skips it on a read-only share
        return values
    finally:
        subprocess.run([*vmctl, "share", "umount", str(mountpoint)], capture_output=True)


def host_only(copies: int) -> dict:
    """host vs vmctl's server over the host's /dev/fuse in each cache mode, 3 times in turn (no guest)."""
    with tempfile.TemporaryDirectory(prefix="vmctl-mounts-bench-") as temp:
        work = Path(temp)
        share = work / "share"
        share.mkdir()
        files, size = make_tree(share, copies)
        result: dict = {"config": {"files": files, "bytes": size, "small_files": SMALL_FILES,
                                   "host_kernel": platform.release(), "nested": os.environ.get("VMCTL_NESTED") == "1",
                                   "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                                   "note": "no guest: the host's own FUSE client in front of vmctl's server "
                                           "(host_fuse_MODE: `cache: MODE`); best of 5 alternating runs each (a shared, noisy machine)"}}
        runs: dict[str, list[dict[str, float]]] = {"host": [], **{f"host_fuse_{m}": [] for m in CACHE_MODES},
                                                   "host_fuse_always_ro": []}
        for _ in range(5):
            runs["host"].append(host_run(share))
            for mode in CACHE_MODES:
                runs[f"host_fuse_{mode}"].append(host_fuse_run(share, work, mode))
                shutil.rmtree(work / "fuse")
            # read-only: the kernel then does not mark atimes stale after each READ, so a
            # second walk needs no GETATTR per file read in the first (docs/sharing.md)
            runs["host_fuse_always_ro"].append(host_fuse_run(share, work, "always", read_only=True))
            shutil.rmtree(work / "fuse")
        for column, values in runs.items():
            result[column] = {w: min(v[w] for v in values) for w in WORKLOADS if w in values[0]}
        return result


def _timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Seconds a command took, and the way `vmctl cp` said it went ("share", "ssh", "agent")."""
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(command[2:])}: exit {done.returncode} after {seconds:.1f} s: {done.stderr.strip()[-500:]}")
    way = re.search(r"done over (\w+)", done.stderr)
    return seconds, way.group(1) if way else ""


EXEC_LINE = re.compile(r"exec: exit \d+ in ([\d.]+) ms")
# `head -c N /dev/zero | base64` through `vmctl exec`, per transport: a UART costs a VM exit
# per byte (milliseconds each in the nested host), so it gets a small size only.
BIG_EXEC_KIB = {"virtio-console": (4, 1024, 4096), "uart": (4,)}


def _agent_ms(folder: Path, seen: int) -> tuple[list[float], int]:
    """The VMM's own exec timings (vmm.log) logged since line `seen`: the agent round trips."""
    lines = (folder / "vmm.log").read_text(errors="replace").splitlines()
    return [float(m.group(1)) for line in lines[seen:] if (m := EXEC_LINE.search(line))], len(lines)


def cp_throughput(work: Path, agent_console: bool = True, launcher: bool = False) -> dict:
    """`vmctl cp` of a CP_MIB file into and out of a running busybox guest (no network), and of
    a 1-byte file (the fixed cost: the CLI's start, two agent round trips), so the data rate
    can be told from the per-command cost. Then `vmctl exec -- true` (the CLI's total vs the
    agent round trip the VMM logs) and execs with a large output. `agent_console`: False
    leaves the agent on its UART (VMCTL_AGENT_CONSOLE=0), the way before its virtio port.
    `launcher`: every command goes through a launcher started here (VMCTL_LAUNCHER), so the
    CLI's own start is a fork of an interpreter that has imported vmctl already."""
    env = dict(os.environ, VMCTL_STATE_DIR=str(work / "state"), VMCTL_AGENT_CONSOLE="1" if agent_console else "0")
    transport = "virtio-console" if agent_console else "uart"
    if not launcher:
        return _cp_exec_runs(work, env, transport)
    (work / "launcher").mkdir(mode=0o700)
    env["VMCTL_LAUNCHER"] = socket_path = str(work / "launcher" / "launcher.sock")
    server = subprocess.Popen([sys.executable, "-m", "vmctl.launcher", "serve", socket_path, "--idle", "900"],
                              env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        from vmctl.launcher.client import wait_for_server

        if not wait_for_server(socket_path, 300):
            raise SystemExit("the launcher did not start")
        return _cp_exec_runs(work, env, transport) | {"launcher": True}
    finally:
        server.terminate()
        server.wait(timeout=60)


def _cp_exec_runs(work: Path, env: dict[str, str], transport: str) -> dict:
    vmctl = [sys.executable, "-m", "vmctl"]
    spec = work / "cp.yaml"
    spec.write_text("machines:\n  cp:\n    memory: 256M\n")
    payload = work / "payload.bin"
    payload.write_bytes(os.urandom(CP_MIB << 20))
    (work / "tiny").write_bytes(b"x")
    _timed([*vmctl, "up", str(spec)], env)
    folder = Path(json.loads(subprocess.run([*vmctl, "status", "cp"], env=env, capture_output=True, text=True).stdout)["folder"])
    result: dict = {"mib": CP_MIB, "transport": transport}
    try:
        _, seen = _agent_ms(folder, 0)
        tiny_in, _ = _timed([*vmctl, "cp", str(work / "tiny"), "cp:/tmp/tiny"], env)
        tiny_in_agent, seen = _agent_ms(folder, seen)
        tiny_out, _ = _timed([*vmctl, "cp", "cp:/tmp/tiny", str(work / "tiny.back")], env)
        tiny_out_agent, seen = _agent_ms(folder, seen)
        into, way_in = _timed([*vmctl, "cp", str(payload), "cp:/tmp/payload.bin"], env)
        out, way_out = _timed([*vmctl, "cp", "cp:/tmp/payload.bin", str(work / "back.bin")], env)
        if (work / "back.bin").read_bytes() != payload.read_bytes():
            raise SystemExit("vmctl cp: the file came back different")
        _, seen = _agent_ms(folder, seen)
        trues = []
        for _ in range(3):
            seconds, _ = _timed([*vmctl, "exec", "cp", "--", "true"], env)
            agent, seen = _agent_ms(folder, seen)
            trues.append((seconds, sum(agent)))
        big = {}
        for kib in BIG_EXEC_KIB[transport]:
            seconds, _ = _timed([*vmctl, "exec", "cp", "--timeout", "600", "--", "sh", "-c",
                                     f"head -c {kib << 10} /dev/zero | base64"], env)
            agent, seen = _agent_ms(folder, seen)
            size = 4 * ((kib << 10) + 2) // 3
            big[f"{kib}KiB"] = {"output_bytes": size, "cli_seconds": round(seconds, 2), "agent_ms": round(sum(agent), 1),
                                "agent_mb_s": round(size / 1e6 / max(sum(agent) / 1000, 1e-6), 3)}
        # The guest's own share of a 1 MiB exec (no port involved): the command, then the
        # agent's base64 of its output, each timed in the guest with busybox `time -p`.
        guest = subprocess.run([*vmctl, "exec", "cp", "--timeout", "600", "--", "sh", "-c",
                                "B=/bin/busybox; $B time -p sh -c '$B head -c 1048576 /dev/zero | $B base64 > /tmp/o' 2>&1;"
                                "$B time -p sh -c '$B base64 -w0 </tmp/o >/dev/null' 2>&1"],
                               env=env, capture_output=True, text=True)
        reals = [float(v) for v in re.findall(r"^real (\S+)", guest.stdout, re.M)]
        if len(reals) == 2:
            result["guest_1MiB_command_ms"], result["guest_1MiB_encode_ms"] = (round(v * 1000) for v in reals)
    finally:
        subprocess.run([*vmctl, "rm", "cp"], env=env, capture_output=True)
    mb = CP_MIB * 1.048576
    best_true = min(trues)
    result.update({
        "way_in": way_in, "way_out": way_out,
        "into_guest_mb_s": round(mb / into, 1), "out_of_guest_mb_s": round(mb / out, 1),
        "into_seconds": round(into, 2), "out_seconds": round(out, 2),
        "tiny_into_seconds": round(tiny_in, 2), "tiny_out_seconds": round(tiny_out, 2),
        "tiny_into_agent_ms": round(sum(tiny_in_agent), 1), "tiny_out_agent_ms": round(sum(tiny_out_agent), 1),
        # the data's own rate: the big copy minus the cost of copying one byte
        "into_guest_data_mb_s": round(mb / max(into - tiny_in, 1e-3), 1),
        "out_of_guest_data_mb_s": round(mb / max(out - tiny_out, 1e-3), 1),
        "exec_true_seconds": round(best_true[0], 2), "exec_true_agent_ms": round(best_true[1], 1),
        "exec_true_cli_seconds": round(best_true[0] - best_true[1] / 1000, 2),
        "exec_big": big})
    return result


def measure(kernel: Path, copies: int, logs: Path | None, skip_cp: bool, partial: Path | None = None) -> dict:
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

        def step(name: str, run) -> None:  # each column is written as soon as it is measured
            progress(name)
            result[name] = run()
            if partial is not None:
                partial.write_text(json.dumps(result, indent=2) + "\n")

        # vmctl_virtiofs: the default `cache: auto`; _always: names and attributes kept for a day
        step("vmctl_virtiofs", lambda: run_guest(vmctl_command(kernel, initrd, share), 1500, logs / "vmctl.log"))
        step("vmctl_virtiofs_always",
             lambda: run_guest(vmctl_command(kernel, initrd, share, "always"), 1500, logs / "vmctl-always.log"))
        # read-only: the guest kernel then keeps atimes, so the cached walk needs no GETATTRs
        step("vmctl_virtiofs_always_ro",
             lambda: run_guest(vmctl_command(kernel, initrd, share, "always", read_only=True), 1500,
                               logs / "vmctl-always-ro.log", WORKLOADS[:2]))
        step("host", lambda: host_run(share))
        if not skip_cp:
            step("cp", lambda: cp_throughput(work))
        for cache in ("none", "loose"):
            step(f"qemu_9p_{cache}",
                 lambda c=cache: run_guest(qemu_command(kernel, initrd, share, c), 1500, logs / f"qemu-9p-{c}.log"))
        return result


def measure_cp() -> dict:
    """--cp-only: `vmctl cp` and `vmctl exec` with the agent on its virtio-console port and on
    its UART, in one run (ratios from one run; the machine is shared and noisy)."""
    result: dict = {"config": {"guest": "busybox image, 1 vCPU, 256 MiB, no network", "host_kernel": platform.release(),
                               "nested": os.environ.get("VMCTL_NESTED") == "1", "date": time.strftime("%Y-%m-%d")}}
    for name, agent_console, launcher in (("virtio-console", True, False), ("uart", False, False),
                                          ("virtio-console+launcher", True, True)):
        with tempfile.TemporaryDirectory(prefix="vmctl-cp-bench-") as temp:
            progress(f"cp + exec, agent over {name}")
            result[name] = cp_throughput(Path(temp), agent_console, launcher)
    return result


def cp_summary(result: dict) -> str:
    rows = [("`vmctl exec -- true` total (s)", lambda c: c["exec_true_seconds"]),
            ("... agent round trip (ms, VMM log)", lambda c: c["exec_true_agent_ms"]),
            ("... CLI start-up and the rest (s)", lambda c: c["exec_true_cli_seconds"]),
            ("1-byte cp in / out (s)", lambda c: f"{c['tiny_into_seconds']} / {c['tiny_out_seconds']}"),
            ("... agent round trips of it (ms)", lambda c: f"{c['tiny_into_agent_ms']} / {c['tiny_out_agent_ms']}"),
            (f"cp {CP_MIB} MiB in / out (MB/s)", lambda c: f"{c['into_guest_mb_s']} / {c['out_of_guest_mb_s']}"),
            ("... without the 1-byte cost (MB/s)", lambda c: f"{c['into_guest_data_mb_s']} / {c['out_of_guest_data_mb_s']}"),
            ("guest side of a 1 MiB exec: command / agent's base64 (ms)",
             lambda c: f"{c.get('guest_1MiB_command_ms', '-')} / {c.get('guest_1MiB_encode_ms', '-')}")]
    names = [n for n in ("virtio-console", "uart", "virtio-console+launcher") if n in result]
    lines = ["| agent over | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(str(get(result[n])) for n in names) + " |" for label, get in rows]
    for name in names:
        for size, big in result[name]["exec_big"].items():
            lines.append(f"| exec `head -c {size} /dev/zero \\| base64` over {name} | {big['output_bytes']} bytes: "
                         f"CLI {big['cli_seconds']} s, agent {big['agent_ms']} ms ({big['agent_mb_s']} MB/s) |")
    return "\n".join(lines)


def summary(result: dict) -> str:
    columns = ["vmctl_virtiofs", "vmctl_virtiofs_always", "vmctl_virtiofs_always_ro", "qemu_9p_none",
               "qemu_9p_loose", "host"]
    lines = ["| workload (s) | " + " | ".join(columns) + " | auto / host | always / host | always ro / host "
             "| auto / 9p (none) | auto / 9p (loose) | always / 9p (loose) |", "|---" * (len(columns) + 7) + "|"]
    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None else f"{a / b:.2f}x"

    for workload in WORKLOADS:
        row = [result.get(c, {}).get(workload) for c in columns]
        ours, always, always_ro, nine_none, nine_loose, host = row
        lines.append(f"| {workload} | " + " | ".join("-" if v is None else f"{v:g}" for v in row)
                     + f" | {ratio(ours, host)} | {ratio(always, host)} | {ratio(always_ro, host)} "
                     f"| {ratio(ours, nine_none)} | {ratio(ours, nine_loose)} | {ratio(always, nine_loose)} |")
    if "cp" in result:
        cp = result["cp"]
        lines.append(f"\nvmctl cp {cp['mib']} MiB over {cp['way_in']}/{cp['way_out']}: into the guest "
                     f"{cp['into_guest_mb_s']} MB/s ({cp['into_guest_data_mb_s']} MB/s without the "
                     f"{cp['tiny_into_seconds']} s a 1-byte cp costs), out {cp['out_of_guest_mb_s']} MB/s "
                     f"({cp['out_of_guest_data_mb_s']} MB/s without {cp['tiny_out_seconds']} s); "
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
    parser.add_argument("--cp-only", action="store_true",
                        help="quick: only `vmctl cp`/`exec`, agent over virtio-console and over the UART "
                             "(results/mounts_cp.json)")
    parser.add_argument("--host-fuse", action="store_true",
                        help="no guest: the host vs vmctl's server through the host's /dev/fuse in each cache mode, best of 5 (results/mounts_host_fuse.json)")
    parser.add_argument("--timeout", type=int, default=840, help="seconds the nested host may run (default 840)")
    args = parser.parse_args(argv)
    kernel = (args.kernel or locate().bzimage).resolve()
    if not kernel.exists():
        raise SystemExit(f"{kernel}: no such kernel (run `vmctl image build`)")
    if args.host_fuse:
        output = (args.output if args.output != RESULTS else RESULTS.with_name("mounts_host_fuse.json")).resolve()
        result = host_only(args.copies)
        output.write_text(json.dumps(result, indent=2) + "\n")
        columns = [*(f"host_fuse_{m}" for m in CACHE_MODES), "host_fuse_always_ro"]
        print("| workload (s) | host | " + " | ".join(f"{c} (x host)" for c in columns)
              + " |\n" + "|---" * (2 + len(columns)) + "|")
        for workload in WORKLOADS:
            host = result["host"][workload]
            cells = [f"{result[c][workload]:g} ({result[c][workload] / max(host, 1e-3):.1f}x)" if workload in result[c]
                     else "-" for c in columns]
            print(f"| {workload} | {host:g} | " + " | ".join(cells) + " |")
        progress(f"wrote {output}")
        return 0
    output = (args.output if args.output != RESULTS or not args.cp_only else RESULTS.with_name("mounts_cp.json")).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.nested:
        inner = [sys.executable, str(Path(__file__).resolve()), "--kernel", str(kernel), "--copies", str(args.copies),
                 "--output", str(output), *(["--skip-cp"] if args.skip_cp else []), *(["--cp-only"] if args.cp_only else [])]
        shares = ["--share", str(output.parent)]
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            inner += ["--logs", str(args.logs.resolve())]
            shares += ["--share", str(args.logs.resolve())]
        return subprocess.run([sys.executable, "-m", "vmctl.nested", "--timeout", str(args.timeout), "--memory", str(args.memory),
                               *shares, "--", *inner], cwd=REPO).returncode
    if args.cp_only:
        result = measure_cp()
        publish(result, output, cp_summary(result))
        return 0
    if args.logs:
        args.logs.mkdir(parents=True, exist_ok=True)
    result = measure(kernel, args.copies, args.logs, args.skip_cp, output.with_suffix(".partial.json"))
    output.with_suffix(".partial.json").unlink(missing_ok=True)
    publish(result, output, summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
