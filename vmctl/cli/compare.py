"""`vmctl compare FILE`: one workload as a container, as a VM and natively, from the same base.

For each way of running it, N times (medians):

    time to ready     start -> the instance can run commands (VM: VMCTL-READY on the console;
                      container: the runtime started it; native: nothing to start)
    time to run       the spec's `command` through `vmctl exec` (agent/SSH in the VM,
                      `<runtime> exec` in the container; native: chroot + /bin/sh)
    host PSS          proportional set size of the instance's host processes (VM: the VMM;
                      container: its cgroup's processes + its monitor)
    disk added        bytes allocated for the instance's writes after the command (VM: its
                      qcow2 overlay; container and native: the overlayfs upper dir)

The VM needs hardware-backed KVM; on a host where /dev/kvm cannot boot Linux (kvm_pvm) the
VM side runs inside the nested host (docs/nested-host.md), which the output says: its times
are those of a VM inside a TCG-emulated L1, not comparable in absolute terms.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import VmctlError
from ..guest_contract import exec_script
from ..suite.meminfo import pss

KINDS = ("native", "container", "vm")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="VMs vs containers: one workload (SPEC), or the benchmark suites (--suite)",
        description=__doc__.split("\n", 2)[2] + SUITE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  vmctl compare examples/container.yaml --name job\n"
        "  vmctl compare work.yaml --runs 5 --json result.json\n"
        "  vmctl compare --suite cpu,disk --only native,container,docker --quick\n"
        "  vmctl compare --suite all --report out/\n"
        "The machine's backend is ignored: it runs every way. Needs root (containers).",
    )
    parser.add_argument("file", type=Path, nargs="?", help="spec file; its machine's image, cpus, memory, environment "
                        "and command (single-workload mode)")
    parser.add_argument("--name", help="machine of the spec file (default: the first)")
    parser.add_argument("--runs", type=int, default=3, help="instances per kind (default 3; medians)")
    parser.add_argument("--only", action="append", help="columns, comma-separated (repeatable): "
                        "SPEC mode: native,container,vm; --suite: native,container,docker,vm,qemu (default all)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per instance (default 300)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--suite", help="startup,cpu,memory,disk,net,app,density,pagecache or all")
    parser.add_argument("--quick", action="store_true", help="short version of every suite (seconds each)")
    parser.add_argument("--instances", default=None, help="instance counts for density/pagecache (default 1,2,4; "
                        "--quick: 1,2)")
    parser.add_argument("--report", type=Path, help="write result.json, table.md, plots and report.html here")
    parser.add_argument("--skip-unavailable", action="store_true", help="mark a column that cannot run here "
                        "'not run: why' instead of failing")
    parser.add_argument("--image", default="bench", help="image profile for --suite (default bench)")
    parser.add_argument("--progress-file", type=Path, help=argparse.SUPPRESS)
    parser.set_defaults(func=cmd_compare)


SUITE_HELP = """
Suites (--suite): the same programs from the same image tree (profile bench: sysbench, fio,
iperf3, redis) in every column: native (chroot + overlay on the host), container (vmctl's
container backend), docker (Docker Engine; its own dockerd when none runs), vm (vmctl's VMM),
qemu (libvirt). Where /dev/kvm cannot boot Linux, vm and qemu run inside the nested host with
their own native and container columns; the table says so. Ends with one table of medians
and ratios to native, Felter et al.'s published ratios beside them (docs/benchmarks-compare.md).
"""


def _columns(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def cmd_compare(args: argparse.Namespace) -> int:
    if args.suite:
        return cmd_suite(args)
    if args.file is None:
        raise VmctlError("give a spec file (one workload) or --suite NAMES (the benchmark suites)")
    from ..spec import load_spec

    kinds = _columns(args.only) or list(KINDS)
    for kind in kinds:
        if kind not in KINDS:
            raise VmctlError(f"--only: unknown kind {kind!r} for a spec file (one of: {', '.join(KINDS)})")
    spec_file = load_spec(args.file)
    spec = spec_file.machine(args.name) if args.name else spec_file.machines[0]
    if not spec.command:
        raise VmctlError(f"{args.file}: machine {spec.name!r} has no `command` to compare")
    result = compare(spec, args.file, args.runs, kinds, args.timeout)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(table(result))
    return 0


def cmd_suite(args: argparse.Namespace) -> int:
    import signal

    from ..suite import report, runner

    if args.file is not None:
        raise VmctlError("--suite runs the built-in workloads: give no spec file with it")
    columns = runner.parse_columns(",".join(_columns(args.only) or runner.COLUMN_NAMES))
    options = runner.Options(
        suites=runner.parse_suites(args.suite), columns=columns, quick=args.quick,
        instances=runner.parse_instances(args.instances or ("1,2" if args.quick else "1,2,4")),
        image=args.image, skip_unavailable=args.skip_unavailable, progress_file=args.progress_file)
    # SIGTERM unwinds like Ctrl-C, so the cleanup in runner.run removes every instance.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    result = runner.run(options)
    if args.json:
        args.json.write_text(report.to_json(result))
    if args.report:
        for path in report.write(result, args.report):
            print(f"wrote {path}", file=sys.stderr)
    print(report.markdown(result))
    if result.failed:
        raise VmctlError(result.failed)
    return 0


def compare(spec, spec_path: Path, runs: int, kinds: list[str], timeout: float) -> dict:
    from ..host_probe import check_host

    report = check_host()
    result: dict = {"machine": spec.name, "image": spec.image, "cpus": spec.cpus, "memory": spec.memory,
                    "command": list(spec.command), "runs": runs, "kvm_mode": report.kvm_module,
                    "nested": os.environ.get("VMCTL_NESTED") == "1"}
    for kind in kinds:
        if kind == "vm" and not report.boots_linux and os.environ.get("VMCTL_NESTED") != "1":
            result["vm"] = _vm_in_nested_host(spec_path, spec.name, runs, timeout, report.kvm_module)
            continue
        samples = []
        for index in range(runs):
            samples.append(measure(kind, spec, timeout, index))
            print(f"{kind} {index + 1}/{runs}: ready {samples[-1]['ready_s']:.3f} s, "
                  f"command {samples[-1]['command_s']:.3f} s", file=sys.stderr)
        result[kind] = summarize(samples)
        if kind == "vm":
            result["vm"]["where"] = "nested host (L1)" if result["nested"] else f"directly on {report.kvm_module}"
        if kind == "container":
            result["container"]["runtime"] = samples[0]["runtime"]
    return result


def summarize(samples: list[dict]) -> dict:
    keys = ("ready_s", "command_s", "pss_bytes", "disk_bytes")
    summary = {key: statistics.median(s[key] for s in samples) for key in keys}
    summary["exit_codes"] = sorted({s["exit_code"] for s in samples})
    summary["samples"] = samples
    return summary


def _script(spec) -> str:
    return exec_script(spec.command, spec.environment)


def measure(kind: str, spec, timeout: float, index: int) -> dict:
    if kind == "native":
        return _measure_native(spec)
    from ..backends import get_backend
    from ..state import StateStore

    backend_name = "container" if kind == "container" else "kvm"
    # Idle instance first (no command): ready time, then the command through exec.
    idle = dataclasses.replace(spec, backend=backend_name, name=f"compare-{kind}-{index}-{os.getpid()}",
                               command=(), ephemeral=False)
    state = Path(tempfile.mkdtemp(prefix="vmctl-compare-"))
    store = StateStore(state)
    backend = get_backend(backend_name)
    try:
        start = time.perf_counter()
        with store.locked():
            record = backend.start(store, idle, None)
        try:
            backend.wait_ready(store, record, timeout)
            ready = time.perf_counter() - start
            start = time.perf_counter()
            outcome = backend.exec(store, record, ["/bin/sh", "-c", _script(spec)], timeout)
            command = time.perf_counter() - start
            usage = backend.usage(store, record)
            sample = {"ready_s": ready, "command_s": command, "pss_bytes": pss(list(usage.pids)),
                      "disk_bytes": usage.disk_bytes, "exit_code": outcome.exit_code, "runtime": usage.runner}
            if usage.helper_pids:  # how much of it is vmctl's monitor (a Python process)
                sample["pss_monitor_bytes"] = pss(list(usage.helper_pids))
        finally:
            with store.locked():
                backend.remove(store, record)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    if sample["exit_code"] != 0:
        raise VmctlError(f"{kind}: the command failed with status {sample['exit_code']}: {outcome.stderr[-300:]!r}")
    return sample


def _measure_native(spec) -> dict:
    """The command on the host, chrooted into an overlay of the same base tree (a private
    mount namespace with the host's /dev and a /proc): no namespaces, cgroup or VM."""
    from ..backends.container.overlay_root import Overlay, base_tree
    from ..proc import allocated_bytes

    folder = Path(tempfile.mkdtemp(prefix="vmctl-compare-native-"))
    overlay = Overlay(base_tree(spec.image), folder)
    try:
        overlay.mount()
        root = shlex.quote(str(overlay.merged))
        wrapper = (f"mount --rbind /dev {root}/dev && mount -t proc proc {root}/proc && "
                   f"exec chroot {root} /bin/sh -c {shlex.quote(_script(spec))}")
        start = time.perf_counter()
        result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", wrapper],
                                capture_output=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"})
        elapsed = time.perf_counter() - start
        disk = allocated_bytes(overlay.upper)
    finally:
        overlay.unmount()
        shutil.rmtree(folder, ignore_errors=True)
    if result.returncode:
        raise VmctlError(f"native: the command failed with status {result.returncode}: {result.stderr[-300:]!r}")
    return {"ready_s": 0.0, "command_s": elapsed, "pss_bytes": 0, "disk_bytes": disk, "exit_code": 0, "runtime": None}


def _vm_in_nested_host(spec_path: Path, name: str, runs: int, timeout: float, host_kvm: str) -> dict:
    """The VM side inside L1, the same command with --only vm; the results come back
    through a shared directory."""
    from ..nested import NestedHost, scratch

    exchange = scratch.make("vmctl-compare-")
    try:
        local_spec = exchange / spec_path.name
        shutil.copy(spec_path, local_spec)
        out = exchange / "vm.json"
        inner = [sys.executable, "-m", "vmctl", "compare", str(local_spec), "--name", name, "--runs", str(runs),
                 "--only", "vm", "--timeout", str(timeout), "--json", str(out)]
        host = NestedHost(memory_mib=2048, cpus=2, shares=[exchange],
                          progress=lambda message: print(f"[nested] {message}", file=sys.stderr))
        print("vm: this host's /dev/kvm cannot boot Linux: the VM runs inside the nested host", file=sys.stderr)
        ran = host.run(inner, cwd=str(Path.cwd()), timeout=timeout * runs * 2 + 300)
        sys.stderr.write(ran.stderr)
        if ran.exit_code != 0 or not out.exists():
            raise VmctlError(f"vm (nested host): exit status {ran.exit_code}: {ran.stderr.strip()[-300:]}")
        inner_result = json.loads(out.read_text())
        vm = inner_result["vm"]
        vm["where"] = f"nested host (L1 under QEMU TCG; host KVM: {host_kvm})"
        vm["l1_kvm_mode"] = inner_result["kvm_mode"]
        return vm
    finally:
        shutil.rmtree(exchange, ignore_errors=True)


def _mib(value: float) -> str:
    return f"{value / (1 << 20):.1f}"


def table(result: dict) -> str:
    rows = ["| | time to ready (s) | time to run the command (s) | host PSS per instance (MiB) "
            "| disk added per instance (MiB) |", "|---|---|---|---|---|"]
    labels = {"native": "native (chroot, same tree)", "container": f"container ({result.get('container', {}).get('runtime')})",
              "vm": f"VM (kvm backend, {result.get('vm', {}).get('where', '')})"}
    for kind in KINDS:
        if kind not in result:
            continue
        r = result[kind]
        ready = "–" if kind == "native" else f"{r['ready_s']:.3f}"
        pss = "–" if kind == "native" else _mib(r["pss_bytes"])
        rows.append(f"| {labels[kind]} | {ready} | {r['command_s']:.3f} | {pss} | {_mib(r['disk_bytes'])} |")
        if kind == "container" and "pss_monitor_bytes" in r["samples"][0]:
            monitor = statistics.median(x["pss_monitor_bytes"] for x in r["samples"])
            rows.append(f"| … of which vmctl's monitor process | | | {_mib(monitor)} | |")
    if "vm" in result and "container" in result:
        c, v = result["container"], result["vm"]
        ratio = lambda key: f"{v[key] / c[key]:.1f}x" if c[key] else "–"  # noqa: E731
        rows.append(f"| VM / container | {ratio('ready_s')} | {ratio('command_s')} | {ratio('pss_bytes')} | {ratio('disk_bytes')} |")
    rows.append("")
    rows.append(f"{result['runs']} instances each, medians; image {result['image']}, {result['cpus']} CPU, "
                f"{result['memory'] >> 20} MiB; command: {shlex.join(result['command'])}; host KVM: {result['kvm_mode']}.")
    if "vm" in result and "nested" in result["vm"].get("where", ""):
        rows.append("The VM ran inside the nested host (an L1 Linux under QEMU TCG): its times and memory are "
                    "not comparable in absolute terms with the container's, which ran on the host.")
    return "\n".join(rows)
