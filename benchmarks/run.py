"""`vmctl run -- true` end to end, split into phases, against the same run on QEMU.

A throwaway guest: the reference kernel and busybox initramfs, plus one disk (the busybox
rootfs.qcow2 through a per-run qcow2 overlay), running `true`. Phases, each timed N times:

    spec load   parse the spec file                        (QEMU: none)
    overlay     state folder, overlay, ssh-less plan        (QEMU: qemu-img create -b)
    boot        VMM process start -> VMCTL-READY on console (same marker, same kernel)
    command     VMCTL-READY -> the guest has ended          (`true`, sync, reboot)
    teardown    remove the machine: process, overlay, state (QEMU: delete the overlay)

plus `vmctl run SPEC -- true` as a whole through the CLI (process start included). Medians.
vmctl runs twice: its VMM daemon as a new interpreter ("vmctl"), and forked by a
pre-initialised launcher ("vmctl_launcher", vmctl.launcher, started once before the runs).
The three alternate (vmctl, launcher, QEMU, vmctl, …) so a change of load hits all alike.
Needs hardware-backed KVM: on a paravirtual-KVM host (kvm_pvm) it re-runs itself inside the
nested host with --nested (absolute times there are ~13x slower than bare metal; the ratios
are what to read).

    python benchmarks/run.py --nested [--runs 5]

Writes benchmarks/results/run.json and prints a markdown table (docs/benchmarks-run.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from fresh_bytecode import compile_vmctl  # noqa: E402
from publish import publish  # noqa: E402

READY = b"VMCTL-READY"
PHASES = ("spec load", "overlay", "boot", "command", "teardown")
SPEC = """machines:
  bench:
    memory: 256M
    disks: [{image: %s}]
    command: [\"true\"]
    ephemeral: true
"""


def _wait_for(predicate, timeout: float, poll: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("guest did not get there in time")
        time.sleep(poll)


def vmctl_phases(spec_path: Path, state: Path, timeout: float) -> dict[str, float]:
    from vmctl.backends import get_backend
    from vmctl.spec import load_spec
    from vmctl.state import CONSOLE, VMM_LOG, StateStore

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    spec = load_spec(spec_path).machines[0]
    t1 = time.perf_counter()
    store = StateStore(state)
    backend = get_backend(spec.backend)
    # `start` = prepare (state folder, overlay, plan) + spawning the VMM; time them apart.
    from vmctl.backends import kvm_prepare

    prepared_at: list[float] = []
    original = kvm_prepare.prepare

    def timed_prepare(*args, **kwargs):
        result = original(*args, **kwargs)
        prepared_at.append(time.perf_counter())
        return result

    # The backend imports `prepare` from kvm_prepare when it starts a machine: patch it there.
    kvm_prepare.prepare = timed_prepare  # type: ignore[assignment]
    try:
        with store.locked():
            record = backend.start(store, spec, str(spec_path))
    finally:
        kvm_prepare.prepare = original  # type: ignore[assignment]
    if not prepared_at:
        raise RuntimeError("the kvm backend did not call vmctl.backends.kvm_prepare.prepare: update run.py's phase timer")
    folder = store.folder(record.name)
    console = folder / CONSOLE
    try:
        _wait_for(lambda: console.exists() and READY in console.read_bytes(), timeout)
    except TimeoutError:
        tails = {name: (folder / name).read_bytes()[-3000:].decode(errors="replace")
                 for name in (CONSOLE, VMM_LOG) if (folder / name).exists()}
        raise TimeoutError(f"no {READY.decode()} after {timeout:.0f} s; state folder tails: {tails}") from None
    t3 = time.perf_counter()
    _wait_for(lambda: store.outcome(record.name) is not None, timeout)
    t4 = time.perf_counter()
    outcome = store.outcome(record.name)
    with store.locked():
        backend.remove(store, record)
    t5 = time.perf_counter()
    if outcome["exit_code"] != 0:
        raise RuntimeError(f"guest failed: {outcome}")
    times.update({"spec load": t1 - t0, "overlay": prepared_at[0] - t1, "boot": t3 - prepared_at[0],
                  "command": t4 - t3, "teardown": t5 - t4})
    return times


def qemu_phases(kernel: Path, initrd: Path, base: Path, cmdline: str, timeout: float) -> dict[str, float]:
    folder = Path(tempfile.mkdtemp(prefix="vmctl-bench-qemu-"))
    overlay = folder / "disk0.qcow2"
    t1 = time.perf_counter()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay)], check=True)
    t2 = time.perf_counter()
    process = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "microvm,accel=kvm,acpi=off", "-cpu", "host", "-m", "256M", "-smp", "1",
         "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio",
         "-drive", f"id=d0,file={overlay},format=qcow2,if=none", "-device", "virtio-blk-device,drive=d0",
         "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    seen = b""
    t3 = None
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    while chunk := process.stdout.read1(65536):
        seen += chunk
        if t3 is None and READY in seen:
            t3 = time.perf_counter()
    process.wait()
    watchdog.cancel()
    t4 = time.perf_counter()
    shutil.rmtree(folder)
    t5 = time.perf_counter()
    if t3 is None or b"VMCTL-EXIT 0" not in seen:
        raise RuntimeError("QEMU guest did not run the command")
    return {"spec load": 0.0, "overlay": t2 - t1, "boot": t3 - t2, "command": t4 - t3, "teardown": t5 - t4}


def cli_total(spec_path: Path, state: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run([str(Path(sys.executable).with_name("vmctl")), "run", str(spec_path), "--", "true"],
                            env={**os.environ, "VMCTL_STATE_DIR": str(state)}, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"vmctl run failed: {result.stderr}")
    return time.perf_counter() - start


@contextlib.contextmanager
def _environment(extra: dict[str, str] | None) -> Iterator[None]:
    """os.environ with `extra` added, restored afterwards."""
    saved = dict(os.environ)
    os.environ.update(extra or {})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def median_ms(samples: list[dict[str, float]]) -> dict[str, float]:
    keys = list(samples[0])
    out = {key: round(statistics.median(s[key] for s in samples) * 1000, 1) for key in keys}
    out["total"] = round(statistics.median(sum(s.values()) for s in samples) * 1000, 1)
    return out


def table(result: dict) -> str:
    ours, qemu, warm = result["vmctl"], result.get("qemu"), result.get("vmctl_launcher")
    rows = ["| phase | vmctl (median ms) | vmctl via the launcher | QEMU + qemu-img (median ms) | vmctl / QEMU "
            "| via the launcher / QEMU |", "|---|---|---|---|---|---|"]
    for phase in (*PHASES, "total"):
        theirs = qemu[phase] if qemu else None
        ratio = f"{ours[phase] / theirs:.2f}x" if theirs else "–"
        warm_ms = warm[phase] if warm else None
        warm_ratio = f"{warm_ms / theirs:.2f}x" if theirs and warm_ms is not None else "–"
        rows.append(f"| {phase} | {ours[phase]} | {warm_ms if warm_ms is not None else '–'} | "
                    f"{theirs if theirs is not None else '–'} | {ratio} | {warm_ratio} |")
    rows.append(f"| `vmctl run SPEC -- true` (CLI, whole) | {result['cli_total_ms']} | "
                f"{result.get('cli_total_launcher_ms', '–')} | | | |")
    rows.append("")
    rows.append(f"{result['runs']} runs each; environment: {result['environment']}.")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--nested", action="store_true", help="run inside the nested host (for paravirtual KVM hosts)")
    parser.add_argument("--no-launcher", action="store_true", help="skip the runs with the VMM forked by a launcher")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "run.json")
    args = parser.parse_args()
    compile_vmctl()  # measure vmctl as installed (fresh bytecode), not a recompiling checkout

    if args.nested:
        from vmctl.nested import NestedHost

        args.output.parent.mkdir(parents=True, exist_ok=True)
        inner = [sys.executable, str(Path(__file__).resolve()), "--runs", str(args.runs), "--output",
                 str(args.output.resolve())] + (["--no-launcher"] if args.no_launcher else [])
        host = NestedHost(memory_mib=2048, cpus=2, shares=[args.output.parent.resolve()],
                          progress=lambda message: print(f"[nested] {message}", file=sys.stderr))
        result = host.run(inner, cwd=str(HERE.parent), timeout=args.timeout * args.runs * 4 + 300)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        return result.exit_code

    from vmctl.guest_contract import AGENT_CMDLINE, DEFAULT_CMDLINE, InitArgs
    from vmctl.host_probe import check_host
    from vmctl.images import locate

    report = check_host()
    if not report.boots_linux:
        print("this host's /dev/kvm cannot boot Linux (see `vmctl host-check`): use --nested", file=sys.stderr)
        return 2
    images = locate("busybox")
    if images.missing():
        print(f"images not built ({', '.join(images.missing())}): run `vmctl image build`", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="vmctl-bench-run-"))
    spec_path = work / "bench.yaml"
    spec_path.write_text(SPEC % images.rootfs_qcow2)
    environment = f"KVM {report.kvm_module}, {os.cpu_count()} CPUs" + (" (inside the nested host)" if os.environ.get("VMCTL_NESTED") == "1" else "")
    result: dict = {"environment": environment, "runs": args.runs, "guest": "busybox initramfs + 1 qcow2 overlay disk, `true`"}
    qemu_ok = bool(shutil.which("qemu-system-x86_64") and shutil.which("qemu-img"))
    # The same guest words vmctl passes (minus the agent, which QEMU does not wire up).
    # reboot=t: QEMU's microvm has no i8042 to reset through; a triple fault ends it (-no-reboot).
    cmdline = " ".join([DEFAULT_CMDLINE.replace("reboot=k", "reboot=t"), AGENT_CMDLINE,
                        *InitArgs(hostname="bench", cmd=["true"]).words()])
    samples: dict[str, list[dict[str, float]]] = {"vmctl": [], "vmctl_launcher": [], "qemu": []}
    cli: dict[str, list[float]] = {"vmctl": [], "vmctl_launcher": []}
    with contextlib.ExitStack() as stack:
        launcher_env: dict[str, str] | None = None
        if not args.no_launcher:
            from vmctl.launcher.session import PrivateLauncher

            launcher_env = stack.enter_context(PrivateLauncher()).env()
        # Alternating vmctl, vmctl via the launcher, QEMU, … so a change of the machine's
        # load hits all three alike.
        for index in range(args.runs):
            for name, env in (("vmctl", None), ("vmctl_launcher", launcher_env)):
                if name == "vmctl_launcher" and env is None:
                    continue
                with _environment(env):  # KvmBackend.start forks the VMM daemon from the launcher
                    samples[name].append(vmctl_phases(spec_path, work / "state", args.timeout))
                    cli[name].append(cli_total(spec_path, work / "state"))
                print(f"{name} run {index + 1}/{args.runs}: {sum(samples[name][-1].values()):.2f} s, "
                      f"CLI {cli[name][-1]:.2f} s", file=sys.stderr)
            if qemu_ok:
                samples["qemu"].append(qemu_phases(images.bzimage, images.initramfs, images.rootfs_qcow2, cmdline, args.timeout))
                print(f"qemu run {index + 1}/{args.runs}: {sum(samples['qemu'][-1].values()):.2f} s", file=sys.stderr)
    for name, suffix in (("vmctl", ""), ("vmctl_launcher", "_launcher")):
        if samples[name]:
            result[name] = median_ms(samples[name])
            result[f"{name}_samples"] = samples[name]
            result[f"cli_total{suffix}_ms"] = round(statistics.median(cli[name]) * 1000, 1)
    if samples["qemu"]:
        result["qemu"] = median_ms(samples["qemu"])
        result["qemu_samples"] = samples["qemu"]
        result["ratio_total"] = round(result["vmctl"]["total"] / result["qemu"]["total"], 2)
        if "vmctl_launcher" in result:
            result["ratio_total_launcher"] = round(result["vmctl_launcher"]["total"] / result["qemu"]["total"], 2)
    shutil.rmtree(work, ignore_errors=True)
    publish(result, args.output, table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
