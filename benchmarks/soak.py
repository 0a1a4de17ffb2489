"""Load, soak and faults (issue 19 item 5): many throwaway machines on this host, vmctl
commands and VMM/monitor processes killed with SIGKILL at random points, then a leak audit.

    python benchmarks/soak.py [--cycles 60] [--parallel 8] [--in-process 40] [--seed 1]
                              [--json benchmarks/results/soak.json]

Machines: tiny guests on the host's /dev/kvm (forever.S from tests/kvm/guests; host KVM cannot
boot Linux here), half of them with `network: nat` (a TAP + a NAT rule), and containers
(backend: container, busybox reference tree), half with `network: nat` (veth + NAT rule).
Each cycle runs one machine through up / exec (containers) / run / down / rm, and kills one
step with SIGKILL after a random delay (the vmctl command, or the VMM daemon / container
monitor); then `vmctl rm` must still clean up. Cycles run one at a time, then `--parallel`
at a time. The audit compares before/after: TAP and veth devices, `iptables -S` and
`iptables -t nat -S`, cgroups under /sys/fs/cgroup/vmctl, /proc/mounts (overlays and all),
state folders, processes naming the state dir, and this process's fds.

`--linux`: the VMs boot the busybox reference Linux instead (where KVM boots Linux: run it in
the nested host, `python -m vmctl.nested --share DIR -- ...`); `--sandbox`: every VMM runs
sandboxed (VMCTL_SANDBOX=1, so a killed VMM's NAT rule is the guard process's to remove).

vmctl's own memory: `--in-process` cycles call vmctl.cli.main(argv) inside this process
(as a long-lived program using vmctl does); its RSS and fd count after a warm-up and at the
end are reported. `--gc-curve` adds RSS and live allocations after `gc.collect()` eight
times along the run, `--tracemalloc` the Python allocations that grew. No timing asserts:
figures only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "tests" / "kvm" / "guests"
VMCTL = [sys.executable, "-m", "vmctl"]


def assemble(out: Path, source: str) -> Path:
    obj, elf = out / (Path(source).stem + ".o"), out / (Path(source).stem + ".elf")
    subprocess.run(["gcc", "-c", str(GUESTS / source), "-o", str(obj)], check=True)
    subprocess.run(["ld", "-static", "-nostdlib", "-N", "--no-warn-rwx-segments", "-Ttext=0x100000",
                    "-e", "_start", str(obj), "-o", str(elf)], check=True)
    return elf


def containers_possible() -> bool:
    try:
        from vmctl.backends.container.runtime import choose
        from vmctl.images import locate

        choose()
        return os.geteuid() == 0 and (locate("busybox").rootfs_tree / "bin").is_dir()
    except Exception:  # noqa: BLE001 - any reason means: tiny guests only
        return False


# --- the audit --------------------------------------------------------------------------

def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True).stdout


def host_snapshot(state: Path, ours: "Seen | None" = None) -> dict[str, list[str]]:
    """Everything a machine could leave behind, as sorted lists of lines. The host is shared
    (other agents run machines too): links, NAT rules and cgroups count only when they carry
    a name one of our machines had (`ours`), mounts only under our work folder."""
    cgroups = []
    base = Path("/sys/fs/cgroup")
    for top in [base / "vmctl", *base.glob("*/vmctl")]:
        if top.is_dir():
            cgroups += [str(p) for p in top.rglob("*") if p.is_dir()]
    processes = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes()
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if str(state).encode() in argv and stat.rsplit(") ", 1)[1][0] != "Z":
                words = argv.replace(b"\0", b" ").decode(errors="replace")[:120]
                processes.append(f"{entry} {words}")
    machines = state / "machines"
    names = ours.names() if ours else set()

    def mine(line: str) -> bool:
        return any(name in line.replace('"', " ").split() or f"vmctl:{name}" in line for name in names)

    return {
        "links": sorted(n for n in os.listdir("/sys/class/net") if n in names),
        "iptables": sorted(line for line in _run("iptables", "-w", "-S").splitlines() if mine(line)),
        "iptables_nat": sorted(line for line in _run("iptables", "-w", "-t", "nat", "-S").splitlines() if mine(line)),
        "cgroups": sorted(c for c in cgroups if Path(c).name in names),
        "mounts": sorted(line for line in open("/proc/mounts").read().splitlines() if str(state.parent) in line),
        "state_folders": sorted(p.name for p in machines.iterdir()) if machines.is_dir() else [],
        "processes": sorted(processes),
        "fds": sorted(f"{fd} -> {_readlink(f'/proc/self/fd/{fd}')}" for fd in os.listdir("/proc/self/fd")),
    }


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def leaks(before: dict[str, list[str]], after: dict[str, list[str]]) -> dict[str, list[str]]:
    found = {}
    for key, lines in after.items():
        new = sorted(set(lines) - set(before.get(key, [])) - {".lock"})
        if key == "processes":
            new = [line for line in new if "soak-holder" not in line]
        if key == "fds":  # the audit's own listdir of /proc/self/fd
            new = [line for line in new if "/proc/" not in line]
        if new:
            found[key] = new
    return found


class Seen:
    """Watches the state folder while the soak runs: the TAP/veth names and container ids our
    machines got (network.json, container.json), so the audit can tell ours from others'."""

    def __init__(self, state: Path) -> None:
        self.state, self.found = state, set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def names(self) -> set[str]:
        self.scan()
        return set(self.found)

    def scan(self) -> None:
        for name in ("network.json", "container.json"):
            for path in (self.state / "machines").glob(f"*/{name}"):
                try:
                    data = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                for key, value in data.items():
                    if key in ("tap", "host_ifname", "ifname", "container_id") and isinstance(value, str):
                        self.found.add(value)

    def _watch(self) -> None:
        while not self.stop.wait(0.1):
            self.scan()


# --- the cycles -------------------------------------------------------------------------

@dataclass
class Tally:
    cycles: int = 0
    machines: int = 0
    commands: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    rm_failures: list[str] = field(default_factory=list)
    leftover_runs: int = 0
    lock = threading.Lock()

    def fault(self, what: str) -> None:
        with self.lock:
            self.faults[what] = self.faults.get(what, 0) + 1


class Soak:
    def __init__(self, work: Path, seed: int, with_containers: bool, linux: bool = False) -> None:
        self.work, self.state = work, work / "state"
        self.env = dict(os.environ, VMCTL_STATE_DIR=str(self.state))
        # Linux guests (the busybox reference image; nested host only here) boot in seconds,
        # not milliseconds: the random kill delays stretch with them.
        self.linux, self.delay_scale = linux, 4.0 if linux else 1.0
        self.random = random.Random(seed)
        self.random_lock = threading.Lock()
        self.kernel = assemble(work, "forever.S")
        self.hello = assemble(work, "hello.S")
        self.with_containers = with_containers
        self.tally = Tally()

    def pick(self, choices):
        with self.random_lock:
            return self.random.choice(choices)

    def uniform(self, low: float, high: float) -> float:
        with self.random_lock:
            return self.random.uniform(low, high)

    def spec(self, name: str, kind: str, nat: bool) -> Path:
        path = self.work / f"{name}.yaml"
        net = "    network: nat\n" if nat else ""
        if kind == "kvm" and self.linux:
            body = f"    memory: 128M\n{net}"  # no kernel: the busybox reference Linux
        elif kind == "kvm":
            body = f"    kernel: {self.kernel}\n    memory: 32M\n{net}"
        else:
            body = f"    backend: container\n    memory: 48M\n{net}"
        path.write_text(f"machines:\n  {name}:\n{body}")
        return path

    def vmctl(self, *args: str, kill_after: float | None = None, timeout: float = 120) -> int | None:
        """Run one vmctl command; with kill_after, SIGKILL it then (None: it was killed)."""
        with self.tally.lock:
            self.tally.commands += 1
        process = subprocess.Popen([*VMCTL, *args], env=self.env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _, err = process.communicate(timeout=kill_after if kill_after is not None else timeout)
            self.last_error = err
            return process.returncode
        except subprocess.TimeoutExpired:
            if kill_after is None:
                raise
            process.kill()
            process.wait()
            self.tally.fault(f"kill -9 vmctl {args[0]}")
            return None

    def kill_machine_process(self, name: str) -> None:
        """SIGKILL the VMM daemon or the container monitor of `name`, if it has one yet."""
        folder = self.state / "machines" / name
        pid = None
        for candidate in ("monitor.pid",):
            try:
                pid = int((folder / candidate).read_text())
            except (OSError, ValueError):
                pass
        if pid is None:
            try:
                pid = json.loads((folder / "machine.json").read_text()).get("pid")
            except (OSError, ValueError):
                pid = None
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
                self.tally.fault("kill -9 VMM/monitor")
            except ProcessLookupError:
                pass

    def cycle(self, index: int) -> None:
        kind = "container" if self.with_containers and index % 2 else "kvm"
        nat = (index // 2) % 2 == 1
        name = f"s{index}"
        spec = self.spec(name, kind, nat)
        steps = ["up", "exec", "down", "rm", "vmm"] if kind == "container" else ["up", "run", "down", "rm", "vmm"]
        faulty = self.pick(steps)
        delay = self.uniform(0.0, 2.5 * self.delay_scale)
        with self.tally.lock:
            self.tally.machines += 1
        if faulty == "run":  # a throwaway `vmctl run` (ephemeral machine), killed mid-way
            throwaway = self.work / f"{name}r.yaml"
            guest = "    memory: 128M\n" if self.linux else f"    kernel: {self.hello}\n    memory: 32M\n"
            throwaway.write_text(f"machines:\n  {name}r:\n{guest}")
            self.vmctl("run", str(throwaway), "--name", f"{name}r", "--", "true", kill_after=delay)
            # A killed `run` leaves its ephemeral machine (NAME-run-ID, shown by `vmctl ps`):
            # removed as a user would, by name.
            for left in (self.state / "machines").glob(f"{name}r-run-*"):
                # (its VMM may finish and remove the ephemeral machine meanwhile: gone is fine)
                if self.vmctl("rm", left.name) != 0 and left.exists():
                    self.tally.rm_failures.append(f"{left.name}: {self.last_error.strip()}")
                with self.tally.lock:
                    self.tally.leftover_runs += 1
            with self.tally.lock:
                self.tally.machines += 1
        self.vmctl("up", str(spec), name, "--no-wait", kill_after=delay if faulty == "up" else None)
        if faulty == "vmm":
            time.sleep(delay)
            self.kill_machine_process(name)
        if kind == "container":
            self.vmctl("exec", name, "--", "sh", "-c", "echo soak; sleep 1",
                       kill_after=delay if faulty == "exec" else None)
        self.vmctl("down", name, "--timeout", "2", kill_after=delay if faulty == "down" else None)
        self.vmctl("rm", name, kill_after=delay / 4 if faulty == "rm" else None)
        # After any fault, a plain `vmctl rm` must leave nothing (it may say "no machine").
        if (self.state / "machines" / name).exists():
            if self.vmctl("rm", name) != 0 and (self.state / "machines" / name).exists():
                self.tally.rm_failures.append(f"{name} ({kind}, fault {faulty}): {self.last_error.strip()}")
        with self.tally.lock:
            self.tally.cycles += 1

    def in_process(self, cycles: int, curve: bool = False, trace: bool = False) -> dict[str, object]:
        """vmctl.cli.main in this process: RSS and fds after a warm-up and at the end."""
        from vmctl.cli import main

        saved_env = os.environ.get("VMCTL_STATE_DIR")
        saved_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        os.environ["VMCTL_STATE_DIR"] = str(self.state)
        try:
            return self._in_process(main, cycles, curve, trace)
        finally:  # main() installs vmctl's handlers; a caller (pytest) gets its own back
            for sig, handler in saved_handlers.items():
                signal.signal(sig, handler)
            if saved_env is None:
                os.environ.pop("VMCTL_STATE_DIR", None)
            else:
                os.environ["VMCTL_STATE_DIR"] = saved_env

    def _in_process(self, main, cycles: int, with_curve: bool = False, trace: bool = False) -> dict[str, object]:
        spec = self.spec("inproc", "kvm", False)
        samples = []
        traced: dict[str, object] = {}
        curve: list[dict[str, int]] = []
        rss_curve: list[list[int]] = []  # [cycle, RSS KiB], 12 times along the run
        for i in range(cycles):
            if trace and i == min(5, cycles - 1):
                gc.collect()
                tracemalloc.start(8)
                first = tracemalloc.take_snapshot()
            for argv in (["up", str(spec), "--no-wait"], ["ps", "--json"], ["down", "inproc", "--timeout", "2"],
                         ["rm", "inproc"]):
                with open(os.devnull, "w") as null:
                    saved = sys.stdout, sys.stderr
                    sys.stdout = sys.stderr = null
                    try:
                        main(argv)
                    except SystemExit:
                        pass
                    finally:
                        sys.stdout, sys.stderr = saved
            if i in (min(4, cycles - 1), cycles - 1):
                samples.append((i + 1, rss_kib(), len(os.listdir("/proc/self/fd"))))
            if (i + 1) % max(1, cycles // 12) == 0:
                rss_curve.append([i + 1, rss_kib()])
            if with_curve and (i + 1) % max(1, cycles // 8) == 0:
                # what is still reachable once cyclic garbage is collected, against RSS
                rss, unreachable = rss_kib(), gc.collect()
                curve.append({"cycle": i + 1, "rss_kib": rss, "collected_objects": unreachable,
                              "live_blocks": sys.getallocatedblocks(), "rss_after_collect_kib": rss_kib()})
        if trace and tracemalloc.is_tracing():
            gc.collect()
            traced = python_growth(first, tracemalloc.take_snapshot(), cycles - min(5, cycles - 1))
            tracemalloc.stop()
        if with_curve:
            traced["after_gc_collect"] = curve
        (w_cycle, w_rss, w_fds), (e_cycle, e_rss, e_fds) = samples[0], samples[-1]
        return {"cycles": cycles, "after_warmup": {"cycle": w_cycle, "rss_kib": w_rss, "fds": w_fds},
                "end": {"cycle": e_cycle, "rss_kib": e_rss, "fds": e_fds},
                "rss_growth_kib": e_rss - w_rss, "fd_growth": e_fds - w_fds, "rss_curve": rss_curve, **traced}


def python_growth(first: tracemalloc.Snapshot, last: tracemalloc.Snapshot, cycles: int) -> dict[str, object]:
    """What Python objects grew between two snapshots: in all, and the top places (by the
    allocating line, vmctl's own frame where there is one)."""
    noise = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap*>")]
    first, last = first.filter_traces(noise), last.filter_traces(noise)
    total = sum(stat.size for stat in last.statistics("filename")) - sum(stat.size for stat in first.statistics("filename"))
    top = []
    for stat in last.compare_to(first, "traceback")[:12]:
        frames = [f"{frame.filename.rsplit('/site-packages/', 1)[-1].rsplit('/lib/python3', 1)[-1]}:{frame.lineno}"
                  for frame in stat.traceback]
        top.append({"size_diff_kib": round(stat.size_diff / 1024, 1), "count_diff": stat.count_diff,
                    "where": frames[-1], "stack": frames})
    return {"python_heap_growth_kib": round(total / 1024, 1), "traced_cycles": cycles,
            "python_heap_growth_per_1000_cycles_kib": round(total / 1024 / max(cycles, 1) * 1000, 1),
            "top_growth": top}


def rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=60, help="cycles one at a time (and as many in parallel)")
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--in-process", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gc-curve", action="store_true",
                        help="in-process cycles: RSS and live allocations after gc.collect(), 8 times")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="in-process cycles: also say which Python allocations grew (slower)")
    parser.add_argument("--no-containers", action="store_true")
    parser.add_argument("--linux", action="store_true",
                        help="VMs boot the busybox reference Linux (a host whose KVM boots Linux: the nested host)")
    parser.add_argument("--sandbox", action="store_true", help="VMMs run sandboxed (VMCTL_SANDBOX=1)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="vmctl-soak-"))
    started = time.monotonic()
    try:
        if args.sandbox:
            os.environ["VMCTL_SANDBOX"] = "1"
            os.chmod(work, 0o755)  # the sandboxed VMM drops to nobody only when it can reach its folder
        soak = Soak(work, args.seed, containers_possible() and not args.no_containers, args.linux)
        seen = Seen(soak.state)
        before = host_snapshot(soak.state)
        for index in range(args.cycles):
            soak.cycle(index)
        sequential = soak.tally.cycles
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(soak.cycle, range(args.cycles, 2 * args.cycles)))
        memory = soak.in_process(args.in_process, args.gc_curve or args.tracemalloc, args.tracemalloc) if args.in_process else None
        time.sleep(1)  # processes killed last are reaped by init
        seen.stop.set()
        found = leaks(before, host_snapshot(soak.state, seen))
        tally = soak.tally
        result = {
            "date": time.strftime("%Y-%m-%d"), "seed": args.seed, "seconds": round(time.monotonic() - started, 1),
            "containers": soak.with_containers, "linux_guests": args.linux, "sandbox": args.sandbox,
            "cycles_sequential": sequential,
            "cycles_parallel": tally.cycles - sequential, "parallel": args.parallel,
            "machines": tally.machines + (args.in_process or 0), "vmctl_commands": tally.commands,
            "faults": dict(sorted(tally.faults.items())), "faults_total": sum(tally.faults.values()),
            "killed_runs_leaving_a_machine": tally.leftover_runs,
            "rm_failures": tally.rm_failures, "links_and_containers_seen": len(seen.found), "leaks": found, "vmctl_in_process": memory,
            "host": "shared 2-core development machine (up to 8 agents at once)",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 1 if result["leaks"] or result["rm_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
