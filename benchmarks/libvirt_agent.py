"""The libvirt backend's exec agent over its virtio console (guest hvc0) vs over COM2 (the UART).

One busybox guest per transport, through libvirt (256 MiB, 1 vCPU, no network; COM2 with
VMCTL_AGENT_CONSOLE=0, the domain as it was before the virtio console):

    first exec     the first exec of `true` in this process; with both ports it also finds
                   the agent's (a no-op request on each)
    round trip     exec of `true` through the agent from this process (no CLI start-up), median
    output cost    exec of `head -c N /dev/zero | base64 -w0`: (time - round trip) / output bytes
    CLI            `vmctl exec -- true` as a whole (the CLI's start included), median

The UART moves a byte per VM exit, so it gets a small output only. Ratios are uart / virtio.

    python benchmarks/libvirt_agent.py --nested     # paravirtual-KVM hosts: inside the nested host
    python benchmarks/libvirt_agent.py --domain-type qemu   # here, QEMU's TCG (no KVM needed)

Writes benchmarks/results/libvirt_agent.json and prints a markdown table.
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
# Keep this folder off the path: benchmarks/libvirt.py would shadow libvirt-python's module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

TRANSPORTS = ("virtio-console", "uart")
# `head -c` sizes in bytes (output: 4/3 of it); COM2 costs ~ms a byte under nested virtualization
OUTPUT_BYTES = {"virtio-console": (65536, 1 << 20), "uart": (384,)}
ROUND_TRIPS = 5
SPEC = """machines:
  {name}:
    backend: libvirt
    cpus: 1
    memory: 256M
    libvirt: {{domain_type: {domain_type}}}
    command: [sh, -c, 'while [ ! -e /tmp/go ]; do sleep 0.2; done']
"""


def progress(message: str) -> None:
    print(f"[libvirt-agent] {message}", file=sys.stderr, flush=True)


def measure(transport: str, work: Path, domain_type: str) -> dict:
    from vmctl.backends.libvirt.backend import LibvirtBackend
    from vmctl.state import StateStore

    name = f"agent-{transport.split('-')[0]}"
    env = dict(os.environ, VMCTL_STATE_DIR=str(work / "state"),
               VMCTL_AGENT_CONSOLE="1" if transport == "virtio-console" else "0")
    vmctl = [sys.executable, "-m", "vmctl"]
    spec = work / f"{name}.yaml"
    spec.write_text(SPEC.format(name=name, domain_type=domain_type))
    up = subprocess.run([*vmctl, "up", str(spec)], env=env, capture_output=True, text=True, timeout=600)
    if up.returncode:
        raise SystemExit(f"vmctl up ({transport}): {up.stderr.strip()[-500:]}")
    try:
        store = StateStore(work / "state")
        agent = LibvirtBackend.agent(store, store.load(name))

        def timed(script: str) -> tuple[float, int]:
            started = time.perf_counter()
            result = agent.exec(script, 600)
            seconds = time.perf_counter() - started
            if result.exit_code:
                raise SystemExit(f"{transport}: {script}: exit {result.exit_code}: {result.stderr[-300:]!r}")
            return seconds, len(result.stdout)

        first, _ = timed("true")
        trips = [timed("true")[0] for _ in range(ROUND_TRIPS)]
        trip = statistics.median(trips)
        found = agent.known()
        output = {}
        for count in OUTPUT_BYTES[transport]:
            seconds, size = timed(f"head -c {count} /dev/zero | /bin/busybox base64 -w0")
            output[str(count)] = {"output_bytes": size, "seconds": round(seconds, 3),
                                   "us_per_byte": round((seconds - trip) / size * 1e6, 2),
                                   "mb_s": round(size / max(seconds - trip, 1e-6) / 1e6, 3)}
            progress(f"{transport}: {size} bytes of output in {seconds:.2f} s")
        cli = []
        for _ in range(3):
            started = time.perf_counter()
            run = subprocess.run([*vmctl, "exec", name, "--", "true"], env=env, capture_output=True, timeout=600)
            cli.append(time.perf_counter() - started)
            if run.returncode:
                raise SystemExit(f"vmctl exec ({transport}): {run.stderr.decode(errors='replace')[-300:]}")
        status = json.loads(subprocess.run([*vmctl, "status", name], env=env, capture_output=True, text=True).stdout)
        agent.exec("touch /tmp/go", 60)
    finally:
        subprocess.run([*vmctl, "rm", name], env=env, capture_output=True, timeout=600)
    return {"found_transport": found, "status_agent_transport": status["agent_transport"],
            "first_exec_ms": round(first * 1000, 1), "round_trip_ms": round(trip * 1000, 1),
            "round_trips_ms": [round(t * 1000, 1) for t in trips], "output": output,
            "cli_exec_true_s": round(statistics.median(cli), 3)}


def table(result: dict) -> str:
    virtio, uart = result["virtio-console"], result["uart"]
    big_v = virtio["output"][str(OUTPUT_BYTES["virtio-console"][-1])]
    big_u = uart["output"][str(OUTPUT_BYTES["uart"][-1])]
    rows = [("agent found on (status `agent_transport`)", "found_transport", None),
            ("first exec of `true` in a process (ms)", "first_exec_ms", None),
            (f"exec `true` round trip, median of {ROUND_TRIPS} (ms)", "round_trip_ms", None),
            ("`vmctl exec -- true` CLI, median of 3 (s)", "cli_exec_true_s", None)]
    lines = ["| libvirt guest agent | virtio-console (hvc0) | uart (COM2) | uart / virtio |", "|---|---|---|---|"]
    for label, key, _ in rows:
        a, b = virtio[key], uart[key]
        ratio = f"{b / a:.2f}x" if isinstance(a, (int, float)) and a else "-"
        lines.append(f"| {label} | {a} | {b} | {ratio} |")
    lines.append(f"| output cost (us/byte; {big_v['output_bytes']} vs {big_u['output_bytes']} bytes) | "
                 f"{big_v['us_per_byte']} | {big_u['us_per_byte']} | {big_u['us_per_byte'] / max(big_v['us_per_byte'], 1e-3):.0f}x |")
    for transport in TRANSPORTS:
        for size, cell in result[transport]["output"].items():
            lines.append(f"| `head -c {size}` over {transport} | {cell['output_bytes']} bytes in {cell['seconds']} s "
                         f"({cell['mb_s']} MB/s beyond the round trip) | | |")
    lines.append("")
    lines.append(f"Environment: {result['environment']}.")
    return "\n".join(lines)


def nested(args: argparse.Namespace) -> int:
    from vmctl.nested import NestedHost

    args.output.parent.mkdir(parents=True, exist_ok=True)
    inner = [sys.executable, str(Path(__file__).resolve()), "--output", str(args.output.resolve()),
             "--domain-type", args.domain_type]
    host = NestedHost(memory_mib=2048, cpus=2, shares=[args.output.parent.resolve()],
                      progress=lambda message: print(f"[nested] {message}", file=sys.stderr))
    result = host.run(inner, cwd=str(HERE.parent), timeout=args.timeout)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.exit_code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--nested", action="store_true", help="run inside the nested host (paravirtual-KVM hosts)")
    parser.add_argument("--domain-type", default="kvm", choices=("kvm", "qemu"), help="libvirt domain type (default kvm)")
    parser.add_argument("--timeout", type=float, default=700, help="seconds the nested host may run (default 700)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "libvirt_agent.json")
    args = parser.parse_args()
    if args.nested:
        return nested(args)

    from vmctl.backends.libvirt.daemons import start_here
    from vmctl.errors import VmctlError

    in_nested = os.environ.get("VMCTL_NESTED") == "1"
    try:
        daemons = start_here()
    except VmctlError as error:
        print(f"libvirt: {error}", file=sys.stderr)
        return 2
    result: dict = {}
    try:
        for transport in TRANSPORTS:
            with tempfile.TemporaryDirectory(prefix="vmctl-lv-agent-", dir="/tmp") as temp:
                progress(f"agent over {transport}")
                result[transport] = measure(transport, Path(temp), args.domain_type)
    finally:
        daemons.stop()
    libvirtd = subprocess.run(["libvirtd", "--version"], capture_output=True, text=True).stdout.strip()
    result["environment"] = (f"{os.cpu_count()} CPUs, {libvirtd}, domain type {args.domain_type}"
                             + (" (inside the nested host)" if in_nested else ""))
    result["date"] = time.strftime("%Y-%m-%d")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    progress(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
