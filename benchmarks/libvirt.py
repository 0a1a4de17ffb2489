"""The libvirt backend against the native one: boot to userspace and `vmctl run -- true`.

Same guest for both, from the same kind of spec file (only `backend:` differs): the reference
kernel and busybox initramfs, 256 MiB, 1 vCPU, no disk, no network, running `true`.

    start      backend.start(): native: state folder + plan + spawn the detached VMM;
               libvirt: state folder + domain XML + createXML (QEMU started by libvirtd)
    ready      the end of start() -> VMCTL-READY on the console log (the guest's userspace)
    command    VMCTL-READY -> the backend reports the guest ended (`true`, sync, reboot)
    remove     backend.remove(): process/domain gone, state folder deleted
    boot to userspace = start + ready

and `vmctl run SPEC -- true` through the CLI as a whole (process start included). The runs of
the two backends alternate; one warm-up run each is not counted (libvirtd caches QEMU's
capabilities on its first domain). Medians.

Needs hardware-backed KVM: on a paravirtual-KVM host (kvm_pvm) run it with --nested, which
re-runs it inside the nested host and starts libvirtd there (absolute times there are ~13x
those of bare metal; read the ratios).

    python benchmarks/libvirt.py --nested [--runs 5]

Writes benchmarks/results/libvirt.json and prints a markdown table (docs/benchmarks-libvirt.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This file is named like libvirt-python's module: keep its folder off the path, or
# `import libvirt` would import this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

READY = b"VMCTL-READY"
BACKENDS = ("kvm", "libvirt")
PHASES = ("start", "ready", "command", "remove")
SPEC = """machines:
  bench-{backend}:
    backend: {backend}
    cpus: 1
    memory: 256M
    command: ["true"]
    ephemeral: true
"""


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:g} s")
        time.sleep(poll)


def phases(spec_path: Path, state: Path, timeout: float) -> dict[str, float]:
    """One guest through the backend API, timed by phase (seconds)."""
    from vmctl.backends import get_backend
    from vmctl.spec import load_spec
    from vmctl.state import CONSOLE, StateStore

    spec = load_spec(spec_path).machines[0]
    store = StateStore(state)
    backend = get_backend(spec.backend)
    t0 = time.perf_counter()
    with store.locked():
        record = backend.start(store, spec, str(spec_path))
    t1 = time.perf_counter()
    try:
        console = store.folder(record.name) / CONSOLE
        _wait_for(lambda: console.exists() and READY in console.read_bytes(), timeout, "VMCTL-READY")
        t2 = time.perf_counter()
        _wait_for(lambda: backend.status(store, record).state != "running", timeout, "the guest's end", 0.02)
        t3 = time.perf_counter()
        status = backend.status(store, record)
    finally:
        with store.locked():
            backend.remove(store, record)
    t4 = time.perf_counter()
    if (status.state, status.exit_code) != ("exited", 0):
        raise RuntimeError(f"{spec.backend}: the guest did not run `true`: {status}")
    return {"start": t1 - t0, "ready": t2 - t1, "command": t3 - t2, "remove": t4 - t3}


def cli_run(spec_path: Path, state: Path, timeout: float) -> float:
    start = time.perf_counter()
    result = subprocess.run([str(Path(sys.executable).with_name("vmctl")), "run", str(spec_path), "--", "true"],
                            env={**os.environ, "VMCTL_STATE_DIR": str(state)}, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"vmctl run ({spec_path.name}) failed: {result.stderr.strip()}")
    return time.perf_counter() - start


def medians_ms(samples: list[dict[str, float]]) -> dict[str, float]:
    out = {key: round(statistics.median(s[key] for s in samples) * 1000, 1) for key in samples[0]}
    out["boot to userspace"] = round(statistics.median(s["start"] + s["ready"] for s in samples) * 1000, 1)
    return out


def table(result: dict) -> str:
    native, libvirt, ratio = result["kvm"], result["libvirt"], result["ratio"]
    rows = ["| metric | native `kvm` (median ms) | `libvirt` (median ms) | libvirt / native |", "|---|---|---|---|"]
    for key in ("boot to userspace", *PHASES, "vmctl run -- true"):
        rows.append(f"| {key} | {native[key]} | {libvirt[key]} | {ratio[key]:.2f}x |")
    rows.append("")
    rows.append(f"{result['runs']} runs each (after one warm-up); environment: {result['environment']}.")
    return "\n".join(rows)


def nested(args: argparse.Namespace) -> int:
    from vmctl.nested import NestedHost

    args.output.parent.mkdir(parents=True, exist_ok=True)
    inner = [sys.executable, str(Path(__file__).resolve()), "--runs", str(args.runs), "--timeout", str(args.timeout),
             "--output", str(args.output.resolve())]
    host = NestedHost(memory_mib=2048, cpus=2, shares=[args.output.parent.resolve()],
                      progress=lambda message: print(f"[nested] {message}", file=sys.stderr))
    result = host.run(inner, cwd=str(HERE.parent), timeout=args.timeout * (args.runs + 1) * 4 + 300)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.exit_code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="measured runs per backend (default 5)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds per guest (default 180)")
    parser.add_argument("--nested", action="store_true", help="run inside the nested host (paravirtual-KVM hosts)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "libvirt.json")
    args = parser.parse_args()
    if args.nested:
        return nested(args)

    from vmctl.backends.libvirt.daemons import start_here
    from vmctl.errors import VmctlError
    from vmctl.host_probe import check_host
    from vmctl.images import locate

    report = check_host()
    if not report.boots_linux:
        print("this host's /dev/kvm cannot boot Linux (see `vmctl host-check`): use --nested", file=sys.stderr)
        return 2
    if not locate("busybox").initramfs.exists():
        print("the reference images are not built: run `vmctl image build`", file=sys.stderr)
        return 2
    in_nested = os.environ.get("VMCTL_NESTED") == "1"
    try:
        daemons = start_here()
    except VmctlError as error:
        print(f"libvirt: {error}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="vmctl-bench-libvirt-"))
    try:
        specs = {}
        for backend in BACKENDS:
            specs[backend] = work / f"{backend}.yaml"
            specs[backend].write_text(SPEC.format(backend=backend))
        state = work / "state"
        samples: dict[str, list[dict[str, float]]] = {b: [] for b in BACKENDS}
        for index in range(args.runs + 1):
            for backend in BACKENDS:
                sample = phases(specs[backend], state, args.timeout)
                sample["vmctl run -- true"] = cli_run(specs[backend], state, args.timeout)
                label = "warm-up" if index == 0 else f"run {index}/{args.runs}"
                print(f"{backend:8} {label}: boot to userspace {sample['start'] + sample['ready']:.2f} s, "
                      f"vmctl run -- true {sample['vmctl run -- true']:.2f} s", file=sys.stderr)
                if index:
                    samples[backend].append(sample)
    finally:
        daemons.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)

    environment = (f"KVM {report.kvm_module}, {os.cpu_count()} CPUs, "
                   f"{subprocess.run(['libvirtd', '--version'], capture_output=True, text=True).stdout.strip()}"
                   + (" (inside the nested host)" if in_nested else ""))
    result: dict = {"environment": environment, "runs": args.runs,
                    "guest": "reference kernel + busybox initramfs, 256 MiB, 1 vCPU, no disk, `true`"}
    for backend in BACKENDS:
        result[backend] = medians_ms(samples[backend])
    result["ratio"] = {key: round(result["libvirt"][key] / result["kvm"][key], 2) for key in result["kvm"]}
    result["samples"] = samples
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
