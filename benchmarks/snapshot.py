"""Snapshots: create time, restore to a first command vs a cold boot, and vs QEMU's
migrate-to-file / -incoming, and the host memory of N concurrent clones.

Same guest everywhere: the reference bzImage + busybox initramfs, 1 vCPU, 256 MiB.
  vmctl cold      `vmctl up` (waits for VMCTL-READY) then `vmctl exec NAME -- true`
  vmctl restore   `vmctl up --from-snapshot SNAP --name NAME` then `vmctl exec NAME -- true`
                  (a memory snapshot of a running, ready guest); also the VMM's own restore
                  time, from its log (snapshot read and checked, VM rebuilt, state set)
  vmctl create    `vmctl snapshot create --memory` of that ready guest (CLI wall time)
  QEMU cold       qemu-system-x86_64 -M microvm to READY, then `echo` on its serial shell
  QEMU restore    `migrate "exec:cat > FILE"` of a ready guest, then a new QEMU with
                  `-incoming "exec:cat FILE"` until an `echo` on its serial shell answers
  memory          N clones running at once: the sum of their VMM processes' Pss against N
                  times one cold-booted guest's Pss; the shared fraction is the part of the
                  clones' resident memory that is shared pages (the snapshot's page cache)

The vmctl times include two CLI invocations (Python start-up) per run, on both sides. Each
pair is run alternately so load changes hit both alike. On a host whose KVM cannot boot Linux
(kvm_pvm) the whole benchmark runs inside ONE nested host (L1 under QEMU TCG with emulated
AMD-V): absolute times are inflated many times over, only the ratios mean something. The
machine is shared with other work: expect noise.

    python benchmarks/snapshot.py [--runs 3] [--clones 8]

`--tiny` measures on this host's /dev/kvm whatever its kind, with a tiny guest instead of
Linux (tests/kvm/guests/counter.S with FILL_MB: it fills FILL_MB MiB of its RAM, then counts
on the serial port, reading every one of those pages per count): snapshot create, restore to
the clone's first console line, and the memory of N clones (each a VMM process of its own
mapping the same memory file) against N times the source's memory. There is no cold-boot
peer in this mode (a tiny guest boots in milliseconds; only Linux makes that comparison).

Writes benchmarks/results/snapshot.json and prints a markdown table (docs/snapshots.md).
"""

from __future__ import annotations

import argparse
import base64
import json
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

from publish import publish  # noqa: E402

VMCTL = str(Path(sys.executable).with_name("vmctl"))
MEMORY = "256M"


def progress(message: str) -> None:
    print(f"[snapshot-bench] {message}", file=sys.stderr, flush=True)


def vmctl(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([VMCTL, *args], capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"vmctl {' '.join(args)}: {result.stderr.strip()}")
    return result


def timed(*commands: tuple[str, ...]) -> float:
    start = time.monotonic()
    for command in commands:
        vmctl(*command)
    return time.monotonic() - start


def first_command(up: tuple[str, ...], name: str, state: Path, env: dict[str, str] | None = None) -> dict:
    """`vmctl up ...` then `vmctl exec NAME -- true`: the total and where it went (the two
    CLI processes' wall times, and from the VMM's log its own start-up and restore steps)."""
    start = time.monotonic()
    result = vmctl(*up, env=env)
    up_s = time.monotonic() - start
    vmctl("exec", name, "--", "true", env=env)
    total = time.monotonic() - start
    ready = re.search(r"ready in ([0-9.]+) s", result.stderr)
    out = {"total_s": total, "up_cli_s": up_s, "exec_cli_s": total - up_s,
           "up_wait_ready_s": float(ready.group(1)) if ready else None}
    return out | vmm_steps(state, name)


# What the VMM logs about its own start (vmctl/vmm/daemon.py, save_restore.py).
VMM_STEPS = {"vmm_start_s": r"([0-9.]+) s from its start to main\(\)", "snapshot_read_ms": r"read and checked in ([0-9.]+) ms",
             "vmm_restore_ms": r"restored .* in ([0-9.]+) ms", "identity_ms": r"clone identity told in ([0-9.]+) ms"}


def vmm_steps(state: Path, name: str) -> dict:
    log = (state / "machines" / name / "vmm.log").read_text()
    steps = {}
    for key, pattern in VMM_STEPS.items():
        match = re.search(pattern, log)
        steps[key] = float(match.group(1)) if match else None
    return steps


def in_process(state: Path, env: dict[str, str]) -> tuple[float, float]:
    """The pytest pattern's path, with no CLI process: vmctl.testing.guest / clone in this
    process (the VMM forked by the launcher in `env`), then exec `true`. (cold, restore) s."""
    from vmctl import testing
    from vmctl.state import StateStore

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        store = StateStore()
        start = time.monotonic()
        with testing.guest({"memory": MEMORY}, name="inproc-cold", store=store) as vm:
            vm.exec("true")
            cold = time.monotonic() - start
        start = time.monotonic()
        with testing.clone("ready", store=store) as vm:
            vm.exec("true")
            restore = time.monotonic() - start
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return cold, restore


def smaps(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        values[key] = int(value.split()[0])
    return values


def vmm_pid(name: str) -> int:
    return next(row["pid"] for row in json.loads(vmctl("ps", "--json").stdout) if row["name"] == name)


def restore_ms(state: Path, name: str) -> float | None:
    return vmm_steps(state, name)["vmm_restore_ms"]


# --- QEMU ------------------------------------------------------------------------------------
class Qemu:
    """microvm with the guest's shell on stdio and the HMP monitor on a Unix socket."""

    def __init__(self, kernel: Path, initrd: Path, folder: Path, incoming: Path | None = None) -> None:
        from vmctl.guest_contract import LOGIN_SHELL

        self.monitor_path = folder / f"monitor-{time.monotonic_ns()}.sock"
        cmd = base64.b64encode(LOGIN_SHELL.encode()).decode()
        argv = ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host", "-m", MEMORY,
                "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-serial", "stdio", "-monitor", f"unix:{self.monitor_path},server,nowait",
                "-kernel", str(kernel), "-initrd", str(initrd),
                "-append", f"console=ttyS0 reboot=t panic=1 quiet vmctl.cmd={cmd}"]
        if incoming is not None:
            argv += ["-incoming", f"exec:cat {incoming}"]
        self.output = b""
        self.lock = threading.Condition()
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while chunk := self.process.stdout.read1(65536):
            with self.lock:
                self.output += chunk
                self.lock.notify_all()

    def wait_for(self, text: bytes, timeout: float) -> None:
        with self.lock:
            if not self.lock.wait_for(lambda: text in self.output, timeout):
                raise RuntimeError(f"QEMU: no {text!r} within {timeout} s: {self.output[-500:]!r}")

    def echo(self, marker: str, timeout: float) -> None:
        """Type `echo MARKER` until its output shows (the shell may not be reading yet)."""
        deadline = time.monotonic() + timeout
        expected = f"\n{marker}".encode()
        while True:
            self.process.stdin.write(f"echo {marker[:3]}''{marker[3:]}\n".encode())
            self.process.stdin.flush()
            try:
                self.wait_for(expected, 1.0)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise

    def hmp(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.monitor_path))
            sock.settimeout(30)
            sock.sendall(command.encode() + b"\n")
            data = b""
            time.sleep(0.2)
            try:
                while chunk := sock.recv(65536):
                    data += chunk
                    if data.rstrip().endswith(b"(qemu)") and command.encode() in data:
                        break
            except TimeoutError:
                pass
            return data.decode(errors="replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.monitor_path.unlink(missing_ok=True)


def qemu_round(kernel: Path, initrd: Path, folder: Path, timeout: float) -> dict[str, float]:
    """One cold boot to a first command, its migrate-to-file, and a restore to a first command."""
    image = folder / "qemu-state"
    image.unlink(missing_ok=True)
    start = time.monotonic()
    source = Qemu(kernel, initrd, folder)
    try:
        source.wait_for(b"VMCTL-READY", timeout)
        source.echo("cold-first", timeout)
        cold = time.monotonic() - start
        time.sleep(0.5)
        saved_at = time.monotonic()
        source.hmp(f'migrate "exec:cat > {image}"')
        while "completed" not in source.hmp("info migrate"):
            if time.monotonic() - saved_at > timeout:
                raise RuntimeError("QEMU migrate to file did not complete")
            time.sleep(0.05)
        save = time.monotonic() - saved_at
    finally:
        source.close()
    start = time.monotonic()
    clone = Qemu(kernel, initrd, folder, incoming=image)
    try:
        clone.echo("restored-first", timeout)
        restore = time.monotonic() - start
    finally:
        clone.close()
    return {"cold_s": cold, "save_s": save, "restore_s": restore, "file_bytes": image.stat().st_size}


# --- the benchmark -----------------------------------------------------------------------------
def median(values: list[float]) -> float:
    return statistics.median(values)


def run_here(args: argparse.Namespace) -> dict:
    from vmctl.images import locate

    images = locate()
    work = Path(tempfile.mkdtemp(prefix="vmctl-snapshot-bench-"))
    state = work / "state"
    os.environ["VMCTL_STATE_DIR"] = str(state)
    spec = work / "vm.yaml"
    spec.write_text(f"machines:\n  src:\n    memory: {MEMORY}\n")
    results: dict = {"cold_s": [], "restore_s": [], "vmm_restore_ms": [], "qemu": [], "cold_steps": [],
                     "restore_steps": [], "launcher": {"cold_steps": [], "restore_steps": []},
                     "in_process": {"cold_s": [], "restore_s": []}}
    names: list[str] = []
    launcher = None
    try:
        vmctl("up", str(spec))  # the source, booted once
        names.append("src")
        vmctl("exec", "src", "--", "true")
        create = timed(("snapshot", "create", "--memory", "src", "ready"))
        meta = json.loads(vmctl("snapshot", "list", "--json").stdout)[0]
        progress(f"snapshot created in {create:.2f} s, memory file {meta['memory_bytes'] >> 20} MiB")
        if not args.no_launcher:
            from vmctl.launcher.session import PrivateLauncher

            launcher = PrivateLauncher()
        cold_spec = work / "cold.yaml"
        for run in range(args.runs):
            cold_spec.write_text(f"machines:\n  cold{run}:\n    memory: {MEMORY}\n")
            cold = first_command(("up", str(cold_spec)), f"cold{run}", state)
            vmctl("rm", f"cold{run}")
            name = f"clone{run}"
            restore = first_command(("up", "--from-snapshot", "ready", "--name", name), name, state)
            names.append(name)
            results["cold_s"].append(cold["total_s"])
            results["restore_s"].append(restore["total_s"])
            results["cold_steps"].append(cold)
            results["restore_steps"].append(restore)
            results["vmm_restore_ms"].append(restore["vmm_restore_ms"])
            if launcher is not None:  # the same, each VMM forked by a launcher that imported it already
                cold_spec.write_text(f"machines:\n  lcold{run}:\n    memory: {MEMORY}\n")
                lcold = first_command(("up", str(cold_spec)), f"lcold{run}", state, launcher.env())
                vmctl("rm", f"lcold{run}")
                lrestore = first_command(("up", "--from-snapshot", "ready", "--name", f"lclone{run}"), f"lclone{run}",
                                         state, launcher.env())
                vmctl("rm", f"lclone{run}")
                results["launcher"]["cold_steps"].append(lcold)
                results["launcher"]["restore_steps"].append(lrestore)
                ip_cold, ip_restore = in_process(state, launcher.env())
                results["in_process"]["cold_s"].append(ip_cold)
                results["in_process"]["restore_s"].append(ip_restore)
                progress(f"run {run + 1}: launcher: cold {lcold['total_s']:.2f} s, restore {lrestore['total_s']:.2f} s; "
                         f"in-process: cold {ip_cold:.2f} s, restore {ip_restore:.2f} s")
            if shutil.which("qemu-system-x86_64") and not args.no_qemu:
                try:
                    results["qemu"].append(qemu_round(images.bzimage, images.initramfs, work, args.timeout))
                except RuntimeError as error:
                    results["qemu_error"] = str(error)
                    progress(f"QEMU: {error}")
            progress(f"run {run + 1}/{args.runs}: cold {cold['total_s']:.2f} s, restore {restore['total_s']:.2f} s "
                     f"(VMM restore {results['vmm_restore_ms'][-1]} ms)"
                     + (f", QEMU cold {results['qemu'][-1]['cold_s']:.2f} s restore {results['qemu'][-1]['restore_s']:.2f} s"
                        if results["qemu"] else ""))
        while len(names) - 1 < args.clones:  # N clones at once for the memory figures
            name = f"clone{len(names) - 1}"
            vmctl("up", "--from-snapshot", "ready", "--name", name)
            vmctl("exec", name, "--", "true")
            names.append(name)
        clones = names[1 : args.clones + 1]
        time.sleep(2)
        clone_maps = [smaps(vmm_pid(name)) for name in clones]
        source_map = smaps(vmm_pid("src"))
        results["memory"] = {
            "clones": len(clones),
            "clones_pss_mib": round(sum(m["Pss"] for m in clone_maps) / 1024, 1),
            "clones_rss_mib": round(sum(m["Rss"] for m in clone_maps) / 1024, 1),
            "one_guest_pss_mib": round(source_map["Pss"] / 1024, 1),
            "shared_fraction": round(sum(m.get("Shared_Clean", 0) + m.get("Shared_Dirty", 0) for m in clone_maps)
                                     / max(sum(m["Rss"] for m in clone_maps), 1), 3),
        }
        results["create_s"] = create
        results["memory_file_mib"] = meta["memory_bytes"] >> 20
    finally:
        if launcher is not None:
            launcher.close()
        for name in names:
            subprocess.run([VMCTL, "rm", name], capture_output=True)
        subprocess.run([VMCTL, "snapshot", "delete", "ready"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return results


def run_tiny(args: argparse.Namespace) -> dict:
    """Host /dev/kvm, tiny guest, through the real CLI (each machine its own VMM process)."""
    work = Path(tempfile.mkdtemp(prefix="vsb-", dir="/tmp"))  # short: Unix socket paths
    state = work / "state"
    os.environ["VMCTL_STATE_DIR"] = str(state)
    obj, elf = work / "counter.o", work / "counter.elf"
    source = HERE.parent / "tests" / "kvm" / "guests" / "counter.S"
    subprocess.run(["gcc", "-c", f"-DFILL_MB={args.fill_mb}", "-DLIMIT=100000000", "-DDELAY=1000", "-DREADY=1",
                    str(source), "-o", str(obj)], check=True)
    subprocess.run(["ld", "-static", "-nostdlib", "-N", "--no-warn-rwx-segments", "-Ttext=0x100000", "-e", "_start",
                    str(obj), "-o", str(elf)], check=True)
    spec = work / "vm.yaml"
    spec.write_text(f"machines:\n  src:\n    kernel: {elf}\n    memory: {MEMORY}\n    disks:\n      - size: 64M\n")

    def lines(name: str) -> int:
        return (state / "machines" / name / "console.log").read_bytes().count(b"\n")

    def wait_lines(name: str, count: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while lines(name) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: {lines(name)} console lines after {timeout} s")
            time.sleep(0.01)

    names = ["src"]
    out: dict = {"restore_s": [], "vmm_restore_ms": [], "first_line_s": []}
    try:
        vmctl("up", str(spec))  # returns at VMCTL-READY, before the fill
        wait_lines("src", 3, args.timeout)  # READY, then counts 1 and 2: filled and read
        source_map = smaps(vmm_pid("src"))
        start = time.monotonic()
        vmctl("snapshot", "create", "--memory", "src", "tiny")
        out["create_s"] = time.monotonic() - start
        meta = json.loads(vmctl("snapshot", "list", "--json").stdout)[0]
        out["memory_file_mib"] = meta["memory_bytes"] >> 20
        progress(f"tiny: snapshot of {args.fill_mb} MiB filled in {out['create_s']:.2f} s")
        for index in range(args.clones):
            name = f"t{index}"
            start = time.monotonic()
            vmctl("up", "--from-snapshot", "tiny", "--name", name)
            out["restore_s"].append(time.monotonic() - start)
            names.append(name)
            wait_lines(name, 1)
            out["first_line_s"].append(time.monotonic() - start)
            out["vmm_restore_ms"].append(restore_ms(state, name))
        for name in names[1:]:
            wait_lines(name, 3)  # every clone has read all filled pages since its restore
        maps = [smaps(vmm_pid(name)) for name in names[1:]]
        out["memory"] = {
            "clones": len(maps),
            "clones_pss_mib": round(sum(m["Pss"] for m in maps) / 1024, 1),
            "clones_rss_mib": round(sum(m["Rss"] for m in maps) / 1024, 1),
            "one_guest_pss_mib": round(source_map["Pss"] / 1024, 1),
            "shared_fraction": round(sum(m.get("Shared_Clean", 0) + m.get("Shared_Dirty", 0) for m in maps)
                                     / max(sum(m["Rss"] for m in maps), 1), 3),
        }
    finally:
        for name in names:
            subprocess.run([VMCTL, "rm", name], capture_output=True)
        subprocess.run([VMCTL, "snapshot", "delete", "tiny"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return out


def summarize_tiny(raw: dict, environment: str, fill_mb: int) -> dict:
    memory = raw["memory"]
    return {"environment": environment, "fill_mib": fill_mb, "raw": raw, "create_s": round(raw["create_s"], 3),
            "memory_file_mib": raw["memory_file_mib"],
            "restore_median_s": round(median(raw["restore_s"]), 3),
            "first_line_median_s": round(median(raw["first_line_s"]), 3),
            "vmm_restore_median_ms": round(median([v for v in raw["vmm_restore_ms"] if v is not None]), 1),
            "memory": memory,
            "ratio_clones_memory": round(memory["clones_pss_mib"] / (memory["clones"] * memory["one_guest_pss_mib"]), 3)}


def table_tiny(result: dict) -> str:
    memory = result["memory"]
    return "\n".join([
        "| tiny guest on this host's /dev/kvm | value |", "|---|---|",
        f"| snapshot create (`vmctl snapshot create --memory`, CLI wall time) | {result['create_s']:.2f} s, "
        f"{result['memory_file_mib']} MiB memory file |",
        f"| restore (`vmctl up --from-snapshot`, CLI wall time, median) | {result['restore_median_s']:.2f} s |",
        f"| restore to the clone's first console line (median) | {result['first_line_median_s']:.2f} s |",
        f"| the VMM's own restore (read + check the snapshot, rebuild the VM, set all state; median) | "
        f"{result['vmm_restore_median_ms']:.0f} ms |",
        f"| {memory['clones']} clones running, sum of VMM Pss | {memory['clones_pss_mib']} MiB "
        f"(Rss {memory['clones_rss_mib']} MiB) |",
        f"| the source guest's VMM Pss | {memory['one_guest_pss_mib']} MiB |",
        f"| clones / ({memory['clones']} x the source) | **{result['ratio_clones_memory']:.2f}** |",
        f"| shared fraction of the clones' resident memory | **{memory['shared_fraction']:.0%}** |",
        "", f"Environment: {result['environment']}."])


def median_steps(steps: list[dict]) -> dict:
    keys = steps[0].keys() if steps else ()
    return {key: round(median(values), 3) for key in keys
            if (values := [step[key] for step in steps if step.get(key) is not None])}


def summarize(raw: dict, environment: str) -> dict:
    out = {"environment": environment, "raw": raw,
           "create_s": round(raw["create_s"], 3), "memory_file_mib": raw["memory_file_mib"],
           "cold_median_s": round(median(raw["cold_s"]), 3), "restore_median_s": round(median(raw["restore_s"]), 3),
           "vmm_restore_median_ms": round(median([v for v in raw["vmm_restore_ms"] if v is not None]), 1),
           "memory": raw["memory"],
           "split": {"cold": median_steps(raw["cold_steps"]), "restore": median_steps(raw["restore_steps"])}}
    out["ratio_cold_over_restore"] = round(out["cold_median_s"] / out["restore_median_s"], 2)
    if raw["launcher"]["cold_steps"]:
        cold, restore = (median([r["total_s"] for r in raw["launcher"][k]]) for k in ("cold_steps", "restore_steps"))
        out["launcher"] = {"cold_median_s": round(cold, 3), "restore_median_s": round(restore, 3),
                           "ratio_cold_over_restore": round(cold / restore, 2),
                           "split": {"cold": median_steps(raw["launcher"]["cold_steps"]),
                                     "restore": median_steps(raw["launcher"]["restore_steps"])}}
        cold, restore = median(raw["in_process"]["cold_s"]), median(raw["in_process"]["restore_s"])
        out["in_process"] = {"cold_median_s": round(cold, 3), "restore_median_s": round(restore, 3),
                             "ratio_cold_over_restore": round(cold / restore, 2)}
    memory = raw["memory"]
    out["ratio_clones_memory"] = round(memory["clones_pss_mib"] / (memory["clones"] * memory["one_guest_pss_mib"]), 3)
    if raw["qemu"]:
        out["qemu"] = {key: round(median([r[key] for r in raw["qemu"]]), 3) for key in ("cold_s", "save_s", "restore_s")}
        out["qemu"]["file_mib"] = raw["qemu"][0]["file_bytes"] >> 20
        out["ratio_qemu_restore_over_ours"] = round(out["qemu"]["restore_s"] / out["restore_median_s"], 2)
    return out


def split_rows(split: dict) -> list[str]:
    """Where cold boot → first command and restore → first command went (medians)."""
    cold, restore = split["cold"], split["restore"]

    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f} s"

    def up_own(step: dict) -> float | None:
        return step["up_cli_s"] - step["up_wait_ready_s"] if step.get("up_wait_ready_s") is not None else None

    def vmm_rest(step: dict, restored: bool) -> float | None:
        if step.get("up_wait_ready_s") is None or step.get("vmm_start_s") is None:
            return None
        spent = sum(step.get(k) or 0 for k in ("snapshot_read_ms", "vmm_restore_ms", "identity_ms")) / 1000 if restored else 0
        return step["up_wait_ready_s"] - step["vmm_start_s"] - spent

    restored_parts = sum(restore.get(k) or 0 for k in ("snapshot_read_ms", "vmm_restore_ms", "identity_ms")) / 1000
    return [
        "| step (median) | cold boot | restore |", "|---|---|---|",
        f"| `vmctl up` process itself (interpreter, imports, overlays, spawn) | {cell(up_own(cold))} | {cell(up_own(restore))} |",
        f"| VMM process: start → main() (interpreter, imports) | {cell(cold.get('vmm_start_s'))} | "
        f"{cell(restore.get('vmm_start_s'))} |",
        f"| VMM: snapshot read + restore + clone identity (agent) | – | {restored_parts:.2f} s "
        f"({restore.get('snapshot_read_ms', 0):.0f} + {restore.get('vmm_restore_ms', 0):.0f} + "
        f"{restore.get('identity_ms', 0):.0f} ms) |",
        f"| the rest of `up`'s wait (cold: VMM set-up + Linux boot to READY) | {cell(vmm_rest(cold, False))} | "
        f"{cell(vmm_rest(restore, True))} |",
        f"| `vmctl exec -- true` process | {cell(cold.get('exec_cli_s'))} | {cell(restore.get('exec_cli_s'))} |",
        f"| total | {cell(cold.get('total_s'))} | {cell(restore.get('total_s'))} |",
    ]


def table(result: dict) -> str:
    rows = ["| what | vmctl | QEMU (microvm) |", "|---|---|---|"]
    qemu = result.get("qemu", {})
    rows.append(f"| cold boot → first command (median) | {result['cold_median_s']:.2f} s | "
                f"{qemu.get('cold_s', float('nan')):.2f} s |")
    rows.append(f"| snapshot create (memory) | {result['create_s']:.2f} s, {result['memory_file_mib']} MiB file | "
                f"{qemu.get('save_s', float('nan')):.2f} s (migrate to file), {qemu.get('file_mib', '–')} MiB |")
    rows.append(f"| restore → first command (median) | **{result['restore_median_s']:.2f} s** "
                f"(VMM restore itself {result['vmm_restore_median_ms']:.0f} ms) | {qemu.get('restore_s', float('nan')):.2f} s (-incoming) |")
    rows.append(f"| cold boot / restore | **{result['ratio_cold_over_restore']:.1f}x** | "
                f"{(qemu['cold_s'] / qemu['restore_s']) if qemu else float('nan'):.1f}x |")
    if "launcher" in result:
        rows += ["", "| path to a first command (median) | cold boot | restore | cold / restore |", "|---|---|---|---|",
                 f"| two `vmctl` processes, the VMM a new interpreter | {result['cold_median_s']:.2f} s | "
                 f"{result['restore_median_s']:.2f} s | {result['ratio_cold_over_restore']:.1f}x |"]
        for key, what in (("launcher", "two `vmctl` processes, the VMM forked by the launcher"),
                          ("in_process", "no CLI: `vmctl.testing` in the caller, the VMM forked by the launcher")):
            row = result[key]
            rows.append(f"| {what} | {row['cold_median_s']:.2f} s | {row['restore_median_s']:.2f} s | "
                        f"**{row['ratio_cold_over_restore']:.1f}x** |")
    rows += [""] + split_rows(result["split"])
    memory = result["memory"]
    rows += ["", "| memory | value |", "|---|---|",
             f"| {memory['clones']} clones, sum of VMM Pss | {memory['clones_pss_mib']} MiB |",
             f"| one cold-booted guest's VMM Pss | {memory['one_guest_pss_mib']} MiB |",
             f"| clones / ({memory['clones']} x one guest) | **{result['ratio_clones_memory']:.2f}** |",
             f"| shared fraction of the clones' resident memory | **{memory['shared_fraction']:.0%}** |",
             "", f"Environment: {result['environment']}."]
    return "\n".join(rows)


def run_nested(args: argparse.Namespace) -> int:
    from vmctl.nested import NestedHost

    output = args.output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    inner = [sys.executable, str(Path(__file__).resolve()), "--here", "--runs", str(args.runs), "--clones",
             str(args.clones), "--timeout", str(args.timeout), "--output", str(output)] + (["--no-qemu"] if args.no_qemu else []) \
        + (["--no-launcher"] if args.no_launcher else [])
    host = NestedHost(memory_mib=args.memory, cpus=2, shares=[output.parent], progress=progress)
    result = host.run(inner, cwd=str(HERE.parent), timeout=args.runs * 6 * args.timeout + 1200)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    progress(f"nested host: L1 boot {result.boot_seconds:.1f} s, benchmark {result.command_seconds:.1f} s")
    return result.exit_code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clones", type=int, default=8, help="clones running at once for the memory figures")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--no-qemu", action="store_true")
    parser.add_argument("--no-launcher", action="store_true", help="leave out the launcher and in-process rows")
    parser.add_argument("--tiny", action="store_true", help="tiny guest on this host's /dev/kvm (see above)")
    parser.add_argument("--fill-mb", type=int, default=64, help="--tiny: MiB the guest fills and reads (default 64)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--nested", action="store_true")
    where.add_argument("--here", action="store_true")
    parser.add_argument("--memory", type=int, default=4096, help="nested host memory in MiB (default 4096)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "snapshot.json")
    args = parser.parse_args()

    from vmctl.host_probe import check_host

    report = check_host()
    if args.tiny:
        environment = (f"KVM {report.kvm_module} on this host, {os.cpu_count()} CPUs, kernel {platform.release()}, "
                       f"tiny guest (counter.S, FILL_MB={args.fill_mb}), {MEMORY}, shared machine, {time.strftime('%Y-%m-%d')}")
        result = summarize_tiny(run_tiny(args), environment, args.fill_mb)
        output = args.output if args.output != HERE / "results" / "snapshot.json" else HERE / "results" / "snapshot-tiny.json"
        publish(result, output, table_tiny(result))
        return 0
    if args.nested or (not args.here and not report.boots_linux):
        progress(f"/dev/kvm here is {report.kvm_module}: running inside one nested host")
        return run_nested(args)
    nested = os.environ.get("VMCTL_NESTED") == "1"
    environment = (f"KVM {report.kvm_module}{' inside the nested host (L1 under QEMU TCG)' if nested else ''}, "
                   f"{os.cpu_count()} CPUs, kernel {platform.release()}, guest: reference bzImage + busybox "
                   f"initramfs, 1 vCPU, {MEMORY}, shared machine, {time.strftime('%Y-%m-%d')}")
    result = summarize(run_here(args), environment)
    publish(result, args.output, table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
