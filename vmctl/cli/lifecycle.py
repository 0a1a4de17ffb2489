"""Lifecycle commands: up, down, ps, status, logs, console, exec, ssh, rm, run."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
import threading
import time
from pathlib import Path

from .. import signals
from ..backends import get_backend
from ..errors import VmctlError
from ..guest_contract import EXIT_PREFIX, READY_MARKER_BYTES
from ..spec.model import BACKENDS, IMAGE_PROFILES, MachineSpec
from ..state import CONSOLE, CONSOLE_SOCKET, StateStore

DEFAULT_SPEC = "vmctl.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser(
        "up", help="start the machines of a spec file",
        description="Start machines declared in a YAML spec (default ./vmctl.yaml), each as its own "
        "detached VMM, and wait until each guest is ready (its console shows VMCTL-READY, which "
        "vmctl's /init prints once mounts, network and sshd are up). A progress line shows the "
        "seconds waited; --timeout makes `up` fail (the machine keeps running: vmctl logs, vmctl rm).",
        epilog="examples:\n  vmctl up examples/web-and-db.yaml\n  vmctl up examples/ssh-debian.yaml --timeout 120\n"
        "  vmctl up vm.yaml web --no-wait && vmctl logs -f web",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument("file", nargs="?", default=DEFAULT_SPEC, type=Path, help="spec file (default vmctl.yaml)")
    up.add_argument("names", nargs="*", help="only these machines (default: all)")
    up.add_argument("--no-wait", action="store_true", help="return as soon as the VMMs started")
    up.add_argument("--timeout", type=float, default=300, help="seconds to wait for readiness (default 300)")
    up.add_argument("--from-snapshot", metavar="SNAP", help="start a new machine (--name) from a snapshot instead of "
                    "a spec: a memory snapshot's guest continues where it was saved (docs/snapshots.md)")
    up.add_argument("--name", help="the new machine's name, with --from-snapshot")
    up.add_argument("--owner-pid", type=int, metavar="PID",
                    help="remove the machines when process PID ends, even if it is killed (a watchdog holds a pidfd)")
    up.set_defaults(func=cmd_up)

    prune = subparsers.add_parser(
        "prune", help="remove machines whose owner is gone, and vmctl's orphaned host resources",
        description="Remove machines whose owner process (pytest plugin, --owner-pid) has ended and "
        "ephemeral machines whose process is gone; then vmctl's persistent TAPs no process holds and "
        "no machine records, container cgroups that are empty and unrecorded, and NAT rules of "
        "vanished TAPs.")
    prune.set_defaults(func=cmd_prune)

    down = subparsers.add_parser(
        "down", help="stop machines",
        description="Ask each guest to shut down (sync and power off, through its agent); after --timeout "
        "the VM is stopped and, if need be, its VMM killed. Ephemeral machines are also removed.")
    down.add_argument("names", nargs="*", help="machines to stop (default: all running)")
    down.add_argument("--timeout", type=float, default=10, help="seconds before the VMM is killed (default 10)")
    down.set_defaults(func=cmd_down)

    ps = subparsers.add_parser(
        "ps", help="list machines",
        description="List machines, their backend and state: running, exited (with its status), crashed, "
        "or dead (the VMM process is gone without saying how: killed; `vmctl rm` cleans up).")
    ps.add_argument("--json", action="store_true", help="print JSON")
    ps.set_defaults(func=cmd_ps)

    status = subparsers.add_parser("status", help="show one machine", description="Show one machine's state as JSON.")
    status.add_argument("name")
    status.set_defaults(func=cmd_status)

    logs = subparsers.add_parser("logs", help="print a machine's console", description="Print the guest console log.")
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the machine ends")
    logs.set_defaults(func=cmd_logs)

    rm = subparsers.add_parser(
        "rm", help="remove machines",
        description="Stop machines if needed and delete everything they hold: VMM process, TAP and NAT "
        "rule, overlays, sockets, key and state folder.")
    rm.add_argument("names", nargs="+")
    rm.set_defaults(func=cmd_rm)

    register_run(subparsers)

    exec_parser = subparsers.add_parser(
        "exec", help="run a command in a running machine",
        usage="vmctl exec NAME [-i] [--timeout S] -- COMMAND [ARG...]",
        description="Run COMMAND in the running machine NAME and exit with its status. It goes through "
        "SSH (paramiko, the machine's own key) when the machine has a network and its sshd answers, "
        "otherwise through the guest agent on the second serial port (no network needed). The "
        "machine's `environment` is set. Like `docker exec`, COMMAND's stdin is empty (/dev/null) "
        "unless -i is given.",
        epilog="examples:\n  vmctl exec web -- cat /etc/os-release\n  echo hello | vmctl exec -i web -- tr a-z A-Z",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    exec_parser.add_argument("name")
    exec_parser.add_argument("-i", "--interactive", action="store_true",
                             help="give COMMAND this command's stdin (read to its end first)")
    exec_parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for the command (default 60)")
    exec_parser.set_defaults(func=cmd_exec)

    console = subparsers.add_parser(
        "console", help="attach to a machine's serial console",
        description="Attach the terminal to the running machine's serial console (COM1): output from "
        "now on, keystrokes to the guest. Ctrl-A x detaches (the machine keeps running); "
        "`vmctl logs NAME` shows what came before.",
    )
    console.add_argument("name")
    console.set_defaults(func=cmd_console)

    ssh = subparsers.add_parser(
        "ssh", help="open an SSH session to a machine",
        usage="vmctl ssh NAME [-- SSH-ARGS...]",
        description="Run the OpenSSH client against the machine's address, as its `ssh.user`, with the "
        "key vmctl made for it. The machine needs a network (nat or isolated) and an sshd "
        "(image: debian). Arguments after -- go to ssh (e.g. a remote command).",
        epilog="examples:\n  vmctl ssh db\n  vmctl ssh db -- -L 5432:localhost:5432",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ssh.add_argument("name")
    ssh.set_defaults(func=cmd_ssh)


def _store() -> StateStore:
    return StateStore()


def _selected(specs: list[MachineSpec], names: list[str], file: Path) -> list[MachineSpec]:
    if not names:
        return specs
    known = {spec.name: spec for spec in specs}
    missing = [name for name in names if name not in known]
    if missing:
        raise VmctlError(f"{file}: no machine named {missing[0]!r} (machines: {', '.join(known)})")
    return [known[name] for name in names]


def cmd_up(args: argparse.Namespace) -> int:
    if args.from_snapshot or args.name:
        if not (args.from_snapshot and args.name):
            raise VmctlError("--from-snapshot SNAP and --name NAME go together")
        from .snapshot_cmd import clone_from_snapshot

        return clone_from_snapshot(args.from_snapshot, args.name, args.no_wait, args.timeout)
    from ..spec import load_spec

    spec_file = load_spec(args.file)
    store = _store()
    if args.owner_pid is not None:
        from ..reaper import ensure_watchdog, owner_of

        store.owner = owner_of(args.owner_pid)
        ensure_watchdog(store.owner, store.root.parent)
    started: list = []
    try:
        selected = _selected(list(spec_file.machines), args.names, args.file)
        _check_linux_guests(selected, args.file)
        with store.locked():
            for spec in selected:
                if store.exists(spec.name):
                    record = store.load(spec.name)
                    state = get_backend(record.backend).status(store, record).state
                    if state == "running":
                        print(f"{spec.name}: already running", file=sys.stderr)
                        continue
                    raise VmctlError(f"{spec.name}: a stopped machine of that name exists ({state}): vmctl rm {spec.name}")
                backend = get_backend(spec.backend)
                if spec.snapshot is not None:  # a clone of a snapshot (its plan, its saved guest)
                    from .snapshot_cmd import clone_record

                    started.append((backend, clone_record(store, spec, str(args.file)), spec))
                    print(f"{spec.name}: started from snapshot {spec.snapshot} (pid {started[-1][1].pid})", file=sys.stderr)
                    continue
                started.append((backend, backend.start(store, spec, str(args.file)), spec))
                print(f"{spec.name}: started ({spec.backend}, pid {started[-1][1].pid})", file=sys.stderr)
        if args.no_wait:
            return 0
        from ..probes import provision, wait_ready

        for backend, record, spec in started:
            with _Progress(f"{record.name}: waiting for the guest (up to {args.timeout:g} s)"):
                seconds = backend.wait_ready(store, record, args.timeout)
            if spec.provision:
                with _Progress(f"{record.name}: provisioning ({len(spec.provision)} script(s))"):
                    provision(store, record, spec.provision)
            if spec.ready:
                with _Progress(f"{record.name}: waiting for {len(spec.ready)} ready probe(s)"):
                    seconds += wait_ready(store, record, spec.ready)
            print(f"{record.name}: ready in {seconds:.2f} s", file=sys.stderr)
    except (KeyboardInterrupt, VmctlError):
        if started:
            _say_still_running([record.name for _, record, _ in started])
        raise
    return 0


def _check_linux_guests(specs: list[MachineSpec], file: Path) -> None:
    """Before starting anything: a Linux VM this host cannot boot fails the whole `up`
    (naming the machines that could start on their own)."""
    from ..host_probe import linux_guest_problem

    def kernel(spec: MachineSpec) -> Path | None:
        if spec.snapshot is None:
            return spec.kernel
        from ..snapshot.snapshot_store import SnapshotStore

        try:  # a clone runs the snapshot's guest: its kernel decides
            return Path(SnapshotStore().load(spec.snapshot).plan["kernel"])
        except (VmctlError, KeyError, TypeError):
            return spec.kernel  # an unknown snapshot is refused, in one line, when it starts

    for spec in specs:
        problem = linux_guest_problem(kernel(spec)) if spec.backend == "kvm" else None
        if problem:
            others = [s.name for s in specs if s.backend != "kvm" or not linux_guest_problem(kernel(s))]
            hint = f" (the others start alone: vmctl up {file} {' '.join(others)})" if others else ""
            raise VmctlError(f"{spec.name}: {problem}{hint}")


def _say_still_running(names: list[str]) -> None:
    """After Ctrl-C in `up`: the machines are detached and keep running; say so and how to stop them."""
    listed = " ".join(names)
    print(f"\rvmctl: {', '.join(names)} {'keeps' if len(names) == 1 else 'keep'} running in the background "
          f"(vmctl ps; stop with vmctl down {listed}, remove with vmctl rm {listed})", file=sys.stderr)


class _Progress:
    """`message… 12s` rewritten in place every second on a terminal; one line otherwise."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.tty = sys.stderr.isatty()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None  # made only on a terminal: a thread
        # whose target is our own method is a reference cycle, garbage for the cyclic GC

    def __enter__(self) -> "_Progress":
        if self.tty:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        else:
            print(f"{self.message}…", file=sys.stderr)
        return self

    def _tick(self) -> None:
        start = time.monotonic()
        while True:
            sys.stderr.write(f"\r{self.message}… {time.monotonic() - start:.0f}s ")
            sys.stderr.flush()
            if self._done.wait(1.0):
                return

    def __exit__(self, *_: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def cmd_down(args: argparse.Namespace) -> int:
    """Each line says what really happened: stopped by the guest, killed after the timeout,
    or not running in the first place (then how it had ended)."""
    store = _store()
    with store.locked():
        names = args.names or store.names()
        for name in names:
            record = store.load(name)
            backend = get_backend(record.backend)
            before = backend.status(store, record)
            if before.state == "running":
                with _Progress(f"{name}: stopping (killed if still running after {args.timeout:g} s)"):
                    backend.stop(store, record, args.timeout)
                reason = str((store.outcome(name) or {}).get("reason") or "")
                forced = "SIGKILL" in reason or "did not shut down" in reason
                what = (f"forced to stop after {args.timeout:g} s" if forced else "stopped") + (f" ({reason})" if reason else "")
            else:
                backend.stop(store, record, args.timeout)  # releases what a dead machine still holds
                what = f"was not running ({before.detail or before.state})"
            if record.ephemeral:
                backend.remove(store, record)
                print(f"{name}: {what}; removed (ephemeral)", file=sys.stderr)
            else:
                print(f"{name}: {what}", file=sys.stderr)
    return 0


def _statuses(store: StateStore) -> list:
    result = []
    for name in store.names():
        try:
            record = store.load(name)
        except VmctlError as problem:  # one broken record must not hide the others
            print(f"warning: {problem} (vmctl rm {name} removes it)", file=sys.stderr)
            continue
        result.append((record, get_backend(record.backend).status(store, record)))
    return result


def cmd_ps(args: argparse.Namespace) -> int:
    rows = _statuses(_store())
    if args.json:
        print(json.dumps([{
            "name": s.name, "backend": s.backend, "state": s.state, "pid": s.pid, "exit_code": s.exit_code,
            "detail": s.detail, "cpus": r.plan.cpus if r.plan else None, "memory": r.plan.memory if r.plan else None, "created": r.created,
            "ephemeral": r.ephemeral, "network": _store().network(r.name),
        } for r, s in rows], indent=2))
        return 0
    width = max([20] + [len(status.name) for _, status in rows])  # long names push the columns, never into them
    print(f"{'NAME':{width}} {'BACKEND':9} {'STATE':8} {'PID':>7} {'CPUS':>4} {'MEMORY':>7} {'AGE':>6}  DETAIL")
    for record, status in rows:
        age = time.time() - record.created
        age_text = f"{age:.0f}s" if age < 120 else f"{age / 60:.0f}m" if age < 7200 else f"{age / 3600:.0f}h"
        memory = f"{(record.plan.memory if record.plan else 0) >> 20}M"
        cpus = record.plan.cpus if record.plan else "-"
        print(f"{status.name:{width}} {status.backend:9} {status.state:8} {status.pid or '-':>7} "
              f"{cpus:>4} {memory:>7} {age_text:>6}  {status.detail}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    store = _store()
    record = store.load(args.name)
    status = get_backend(record.backend).status(store, record)
    print(json.dumps({
        "name": record.name, "backend": record.backend, "state": status.state, "pid": status.pid,
        "exit_code": status.exit_code, "detail": status.detail, "spec": record.plan.to_json() if record.plan else {}, "spec_file": record.spec_file,
        "ephemeral": record.ephemeral, "folder": str(store.folder(record.name)), "network": store.network(record.name),
        "sandbox": _sandbox_state(store.folder(record.name)),
        "agent_transport": _agent_transport(store.folder(record.name), record.pid) if status.state == "running" else None,
    }, indent=2))
    return 0 if status.state in ("running", "exited") else 1


def _agent_transport(folder, pid: int | None = None) -> str | None:
    """What the machine's exec agent runs over ("virtio-console" or "uart"): the native VMM
    says over its control socket; a libvirt machine's is the port its agent answered on in
    QEMU process `pid` (known once an exec asked). None: not known, or the agent has not started."""
    from ..machine_files import AGENT_TRANSPORT, CONTROL
    from ..vmm.control import request

    if not (folder / CONTROL).exists():
        from ..backends.libvirt.agent_ports import known_transport

        return known_transport(folder / AGENT_TRANSPORT, pid)
    try:
        return request(folder / CONTROL, "status").get("agent_transport")
    except VmctlError:
        return None


def _sandbox_state(folder) -> dict:
    """What the VMM wrote when it entered its sandbox (VMCTL_SANDBOX=1), else nothing on."""
    try:
        return json.loads((folder / "sandbox.json").read_text())
    except (OSError, ValueError):
        return {"seccomp": "off", "no_new_privs": False}


def cmd_logs(args: argparse.Namespace) -> int:
    store = _store()
    record = store.load(args.name)
    path = store.folder(args.name) / CONSOLE
    backend = get_backend(record.backend)
    with open(path, "rb") if path.exists() else open("/dev/null", "rb") as handle:
        while True:
            data = handle.read(65536)
            if data:
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
                continue
            if not args.follow or backend.status(store, record).state != "running":
                return 0
            time.sleep(0.2)


def cmd_prune(args: argparse.Namespace) -> int:
    from ..reaper import prune

    for line in prune(_store()):
        print(line, file=sys.stderr)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    """Every name is tried (as `docker rm a b` does): one unknown name does not keep the
    others; the exit status says whether any failed."""
    store = _store()
    failed = 0
    with store.locked():
        for name in args.names:
            try:
                _remove_one(store, name)
            except VmctlError as error:
                print(f"vmctl: error: {error}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


def _remove_one(store: StateStore, name: str) -> None:
    try:
        record = store.load(name)
    except VmctlError as problem:
        if not store.folder(name).is_dir():
            raise
        from .salvage import salvage

        print(salvage(store, name, problem), file=sys.stderr)
        return
    get_backend(record.backend).remove(store, record)
    print(f"{name}: removed", file=sys.stderr)


def register_run(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run", help="boot a throwaway guest, run a command, print its output",
        usage="vmctl run [FILE] [options] [-- COMMAND [ARG...]]",
        description="Boot an ephemeral guest (from a spec file, or the reference images), run COMMAND "
        "in it, print the command's output and exit with its status. The guest and its state "
        "are removed afterwards, whatever happens.",
        epilog="examples:\n  vmctl run -- uname -a\n  vmctl run examples/throwaway.yaml\n  vmctl run --image debian -- python3 -V\n"
        "  vmctl run --cpus 2 --memory 512M -- sh -c 'nproc; free -m'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("file", nargs="?", type=Path, help="spec file (default: the reference images)")
    run.add_argument("--name", help="machine of the spec file to run (default: the first)")
    run.add_argument("--image", type=_image_arg, help="reference image: busybox (initramfs, default) or "
                     "debian (root disk through a throwaway overlay), or an imported OCI image: oci:NAME[@sha256:…]")
    run.add_argument("--backend", choices=BACKENDS, help="kvm (default), libvirt or container")
    run.add_argument("--kernel", type=Path, help="kernel (default: the reference kernel)")
    run.add_argument("--initrd", type=Path, help="initramfs (default: the reference initramfs)")
    run.add_argument("--cpus", type=int, help="vCPUs")
    run.add_argument("--memory", help="guest RAM, e.g. 512M")
    run.add_argument("--timeout", type=float, default=600, help="seconds before the guest is killed (default 600)")
    run.add_argument("--show-boot", action="store_true", help="print the whole console, not only the command's output")
    run.add_argument("-i", "--interactive", action="store_true",
                     help="give COMMAND this command's stdin (read to its end first); without -i its stdin is "
                     "empty (/dev/null), as with `docker run`")
    run.add_argument("--nested", action="store_true", help="run it inside the nested host (an L1 Linux under QEMU, "
                     "docs/nested-host.md): for hosts whose /dev/kvm cannot boot Linux (vmctl host-check)")
    run.set_defaults(func=cmd_run)


def _image_arg(value: str) -> str:
    if value.startswith("oci:"):
        from ..oci.runconfig import parse_ref

        try:
            parse_ref(value)
        except VmctlError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value
    if value not in IMAGE_PROFILES:
        raise argparse.ArgumentTypeError(f"{value!r}: one of {', '.join(IMAGE_PROFILES)} or oci:NAME")
    return value


def cmd_run(args: argparse.Namespace) -> int:
    import dataclasses
    import uuid

    from ..limits import MAX_CPUS, MIN_MEMORY
    from ..spec import load_spec, parse_spec
    from ..units import parse_size

    command = args.passthrough
    if args.nested:
        return _run_nested(args)
    if args.file:
        spec_file = load_spec(args.file)
        spec = spec_file.machine(args.name) if args.name else spec_file.machines[0]
    else:
        spec = parse_spec({"name": "run"}).machines[0]
    suffix = uuid.uuid4().hex[:8]  # "run-1a2b3c4d" for the reference images, "web-run-1a2b3c4d" for a spec's web
    overrides: dict = {"ephemeral": True, "name": f"run-{suffix}" if spec.name == "run" else f"{spec.name}-run-{suffix}"}
    if command:
        overrides["command"] = tuple(command)
    stdin = None
    if args.interactive:
        # The command waits for its input file, which vmctl writes through `exec` once the
        # guest is up (every backend can exec; none streams a boot-time command's stdin).
        stdin = sys.stdin.buffer.read()
        wanted = overrides.get("command") or spec.command
        overrides["command"] = ("/bin/sh", "-c", f"while [ ! -e {STDIN_READY} ]; do sleep 0.1; done; "
                                f"exec {shlex.join(wanted)} < {STDIN_FILE}") if wanted else ()
    for field in ("image", "kernel", "initrd", "cpus", "backend"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    if args.memory:
        overrides["memory"] = parse_size(args.memory, "--memory")
        if overrides["memory"] < MIN_MEMORY:
            raise VmctlError(f"--memory {args.memory}: below the minimum of {MIN_MEMORY >> 20}M")
    if args.cpus is not None and not 1 <= args.cpus <= MAX_CPUS:
        raise VmctlError(f"--cpus {args.cpus}: out of range 1..{MAX_CPUS}")
    spec = dataclasses.replace(spec, **overrides)
    if not spec.command and not spec.image.startswith("oci:"):  # an OCI image has its own Cmd
        raise VmctlError("nothing to run: give -- COMMAND or a `command:` in the spec")

    from ..reaper import ensure_watchdog, owner_of

    store = _store()
    store.owner = owner_of(os.getpid())  # a `vmctl run` killed with -9 takes its guest along
    ensure_watchdog(store.owner, store.root.parent)
    backend = get_backend(spec.backend)
    record = None
    try:
        with store.locked():
            record = backend.start(store, spec, str(args.file) if args.file else None)
        if stdin is not None:
            _give_stdin(store, backend, record, stdin, args.timeout)
        return _follow_until_exit(store, backend, record, args.timeout, args.show_boot)
    finally:
        if record is not None:
            # Ctrl-C, SIGTERM, SIGHUP or a closed stdout end up here; a second signal
            # waits until the guest is gone (vmctl.signals).
            with signals.deferred(), store.locked():
                backend.remove(store, record)


STDIN_FILE = "/tmp/.vmctl-run-stdin"
STDIN_READY = "/tmp/.vmctl-run-stdin.ready"


def _give_stdin(store: StateStore, backend, record, data: bytes, timeout: float) -> None:
    """`run -i`: once the guest is ready, write the input file its command waits for."""
    backend.wait_ready(store, record, timeout)
    result = backend.exec(store, record, ["sh", "-c", f"cat > {STDIN_FILE} && touch {STDIN_READY}"], timeout,
                          stdin=data)
    if result.exit_code:
        raise VmctlError(f"{record.name}: cannot give the command its stdin: "
                         f"{result.stderr.decode(errors='replace').strip()}")


def _run_nested(args: argparse.Namespace) -> int:
    """`vmctl run --nested …`: the same command, run by `python -m vmctl.nested` in an L1 Linux
    whose /dev/kvm boots Linux; its output and exit status are this command's."""
    argv = [word for word in sys.argv[1:sys.argv.index("--") if "--" in sys.argv else len(sys.argv)] if word != "--nested"]
    inner = [str(Path(sys.executable).with_name("vmctl")), *argv, "--", *args.passthrough] if args.passthrough \
        else [str(Path(sys.executable).with_name("vmctl")), *argv]
    nested = [sys.executable, "-m", "vmctl.nested", "--timeout", f"{args.timeout + 300:g}", "--", *inner]
    sys.stdout.flush()
    os.execv(sys.executable, nested)
    return 125  # not reached


def _follow_until_exit(store: StateStore, backend, record, timeout: float, show_boot: bool) -> int:
    """Stream the command's output (between the READY and EXIT markers) until the guest ends."""
    path = store.folder(record.name) / CONSOLE
    deadline = time.monotonic() + timeout
    printing = show_boot
    pending = b""
    offset = 0
    while True:
        status = backend.status(store, record)
        if path.exists():
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read()
                offset += len(data)
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                text = line.rstrip(b"\r")
                if text.startswith(EXIT_PREFIX.encode()):
                    printing = show_boot
                if text.startswith(b"VMCTL-SETUP-FAILED "):
                    print(f"vmctl: {record.name}: the guest's set-up failed: "
                          f"{text.split(b' ', 1)[1].decode(errors='replace')}", file=sys.stderr)
                if text.startswith(b"VMCTL-SETUP-") and not show_boot:
                    continue
                if printing:
                    sys.stdout.buffer.write(text + b"\n")
                if text == READY_MARKER_BYTES:
                    printing = True
            sys.stdout.flush()
        if status.state != "running":
            if status.state in ("crashed", "dead"):
                raise VmctlError(f"{record.name}: {status.detail}")
            return status.exit_code or 0
        if time.monotonic() > deadline:
            raise VmctlError(f"{record.name}: still running after {timeout:g} s: stopped")
        signals.check()
        time.sleep(0.05)


def cmd_exec(args: argparse.Namespace) -> int:
    if not args.passthrough:
        raise VmctlError("nothing to run: vmctl exec NAME -- COMMAND")
    store = _store()
    record = store.load(args.name)
    backend = get_backend(record.backend)
    _require_running(store, backend, record)
    stdin = sys.stdin.buffer.read() if args.interactive else None
    result = backend.exec(store, record, args.passthrough, args.timeout, stdin=stdin)
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    return result.exit_code


def _require_running(store: StateStore, backend, record) -> None:
    """A one-line error naming the next step when the machine is not running."""
    status = backend.status(store, record)
    if status.state == "running":
        return
    how = f"{status.state}: {status.detail}" if status.detail else status.state
    again = f"vmctl rm {record.name} && vmctl up {record.spec_file} {record.name}" if record.spec_file \
        else f"vmctl rm {record.name}"
    raise VmctlError(f"{record.name}: not running ({how}); `vmctl logs {record.name}` shows its output, "
                     f"`{again}` starts it afresh")


def cmd_console(args: argparse.Namespace) -> int:
    from ..vmm.serial_console import ConsoleInput

    store = _store()
    record = store.load(args.name)
    path = store.folder(args.name) / CONSOLE_SOCKET
    backend = get_backend(record.backend)
    _require_running(store, backend, record)
    if record.backend == "container":
        raise VmctlError(f"{args.name}: a container has no serial console: `vmctl exec {args.name} -- sh -c ...` "
                         f"runs commands in it, `vmctl logs -f {args.name}` follows its output")
    if not path.exists():
        raise VmctlError(f"{args.name}: no console socket ({path}): `vmctl logs {args.name}` shows its console")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as error:
        raise VmctlError(f"{args.name}: cannot attach to the console: {error.strerror}") from None
    print(f"[attached to {args.name}'s console; Ctrl-A x detaches]", file=sys.stderr)
    detached = threading.Event()

    def detach() -> None:
        detached.set()
        sock.shutdown(socket.SHUT_RDWR)

    keyboard = ConsoleInput(sock.sendall, detach)
    keyboard.start()
    try:
        while data := sock.recv(65536):
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
    except OSError:
        pass
    finally:
        keyboard.stop()
        sock.close()
    print(f"\r\n[{'detached' if detached.is_set() else 'the machine ended'}]", file=sys.stderr)
    return 0


def cmd_ssh(args: argparse.Namespace) -> int:
    from ..ssh import port_open, ssh_argv

    store = _store()
    record = store.load(args.name)
    backend = get_backend(record.backend)
    _require_running(store, backend, record)
    if record.backend == "container":
        raise VmctlError(f"{args.name}: a container runs no sshd: `vmctl exec {args.name} -- sh -c ...` runs "
                         f"commands in it")
    found = backend.ssh_target(store, record, probe=False)
    if found is None:
        raise VmctlError(f"{args.name}: no network to SSH to (give it `network: isolated` or `nat`; "
                         f"without one use vmctl exec or vmctl console)")
    host, user, key = found
    if not port_open(host, 22):
        image = record.plan.image if record.plan else None
        why = "the busybox image has no sshd (image: debian has one)" if image == "busybox" else \
            "its sshd does not answer (yet?)"
        raise VmctlError(f"{args.name}: nothing listens on {host}:22: {why}; `vmctl exec {args.name} -- CMD` "
                         f"and `vmctl console {args.name}` work without SSH")
    argv = ssh_argv(host, user, key, args.passthrough)
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        raise VmctlError("the OpenSSH client `ssh` is not installed (Debian: apt-get install openssh-client)") from None
