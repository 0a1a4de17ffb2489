"""A detached VMM process for one machine: `python -m vmctl.vmm.daemon FOLDER PLAN_FILE`.

PLAN_FILE holds a `vmctl.plans.KvmPlan` (`vmctl.backends.kvm_prepare` made it); FOLDER is
where the machine's files go (vmctl.machine_files). The daemon knows nothing of the state
store or the machine record. It opens the machine's
network (TAP, NAT, port forwards) and disks, runs the machine with its console in
console.log and on console.sock, answers the control socket, and writes outcome.json when
the guest ends (however it ends). Everything it holds that the kernel would not release by
itself on SIGKILL lives in the machine folder (overlays, sockets, key) or is swept by the
next network setup (NAT rules of vanished TAPs).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import VmctlError
from ..guest_contract import SHUTDOWN_SCRIPT
from ..machine_files import CONSOLE, CONSOLE_SOCKET, CONTROL, DISKS, NETWORK, OUTCOME, VMM_LOG
from ..plans import KvmPlan
from ..proc import write_json_atomic
from .console_server import ConsoleServer
from .control import ControlServer
from .forward import Forwarder
from .machine import Machine, MachineConfig
from .outcome import Outcome

if TYPE_CHECKING:
    from ..snapshot.snapshot_file import SnapshotFile
    from ..virtio.factories import NetFactory

log = logging.getLogger("vmctl.vmm")


class MachineProcess:
    """One machine's devices and services around `Machine`, and their teardown."""

    def __init__(self, folder: Path, plan: KvmPlan) -> None:
        self.folder = folder
        self.plan = plan
        self.started = time.time()
        self.net: NetFactory | None = None
        self.forwarders: list[Forwarder] = []
        self.console_file = open(folder / CONSOLE, "ab", buffering=0)
        self.console_server: ConsoleServer | None = None
        self.machine: Machine | None = None
        self.shutdown_requested = threading.Event()
        self.restore = plan.restore  # a memory snapshot to continue (a clone or a restore)
        self.ready = threading.Event()  # a restored guest: restored and told its identity

    def _type(self, data: bytes) -> None:
        if self.machine is not None and self.machine.serial is not None:
            self.machine.serial.feed(data)

    def build(self) -> Machine:
        from ..virtio.factories import NetFactory, block, fs, pmem

        plan = self.plan
        self.console_server = ConsoleServer(self.folder / CONSOLE_SOCKET, self._type)
        devices = [block(disk.path, disk.read_only) for disk in plan.disks]
        devices += [fs(m.host, m.tag, m.read_only, m.cache) for m in plan.mounts]
        devices += [pmem(p.path) for p in plan.pmem]
        cmdline = plan.cmdline
        network = plan.network
        if network.mode != "none":
            self.net = NetFactory(network.mode, network.mac)
            devices.append(self.net)
            cmdline = " ".join([cmdline, *self.net.cmdline_words()])
            host = self.net.network
            for forward in network.forwards:
                self.forwarders.append(Forwarder(forward.host_port, host.guest_ip, forward.guest_port, forward.protocol))
            # host port 0 was a free port picked at bind time: record the real one
            forwards = [[f.port, f.target[1], f.protocol] for f in self.forwarders]
            write_json_atomic(self.folder / NETWORK, host.describe() | {"forwards": forwards})
        before_start = self._enter_sandbox if os.environ.get("VMCTL_SANDBOX") == "1" else None
        restore_from = None
        if self.restore:
            from ..snapshot.snapshot_file import read_snapshot

            began = time.monotonic()
            restore_from = read_snapshot(Path(self.restore.snapshot))
            log.info("snapshot %s read and checked in %.1f ms", self.restore.snapshot, (time.monotonic() - began) * 1000)
        config = MachineConfig(
            before_start=before_start,
            kernel=Path(plan.kernel), initrd=Path(plan.initrd) if plan.initrd else None, cmdline=cmdline,
            cpus=plan.cpus, memory=plan.memory, memory_merge=plan.memory_merge,
            console_sinks=[self.console_file, self.console_server],
            agent=True, agent_console=_agent_console(restore_from), devices=devices,
        )
        self.machine = Machine(config, restore_from=restore_from)
        return self.machine

    def _enter_sandbox(self) -> None:
        """VMCTL_SANDBOX=1: seccomp allow-list + no_new_privs once every fd is open, and user
        nobody when other users can reach the state folder (the outcome is written there).
        With a network, what still needs privileges is done before: the NAT rule goes to a
        guard process that deletes it when this process ends (net/guard.py), and
        /dev/vhost-net is opened now. What is on goes to sandbox.json (`vmctl status`)."""
        import importlib

        from .sandbox import enter

        for module in PRELOAD:  # `nobody` may not read the interpreter's files (/root/.pyenv)
            importlib.import_module(module)
        notes = []
        if self.net is not None:
            guarded = self.net.network.guard_nat_rule()
            if guarded:
                notes.append(guarded)
            notes += self.net.before_sandbox()
        drop, note = "nobody", None
        if not _reachable_by_others(self.folder):
            drop, note = None, f"kept root: {self.folder} is not reachable by other users"
        writable = [str(path) for path in _tree(self.folder)] if drop else []
        state = enter(drop, writable)
        state.notes += notes + ([note] if note else [])
        write_json_atomic(self.folder / "sandbox.json", state.as_dict())
        log.info("sandbox: %s", state.as_dict())

    # --- control requests ---------------------------------------------------------------------
    def status(self, _: dict) -> dict:
        machine = self.machine
        agent = machine.agent is not None and machine.agent.ready.is_set() if machine else False
        return {"state": "running", "pid": os.getpid(), "uptime": time.time() - self.started,
                "exits": machine.exits if machine else 0, "agent": agent, "restored": bool(self.restore),
                "agent_transport": machine.agent.transport if agent and machine and machine.agent else None,
                "ready": self.ready.is_set()}

    def snapshot(self, message: dict) -> dict:
        """Pause the guest; freeze each overlay vmctl made into a read-only layer in `folder`
        (the machine goes on over a new overlay); with `memory`, save the whole machine too."""
        from ..disk.block_backend import open_disk
        from ..snapshot.disk_layers import freeze_overlay

        folder = Path(str(message["folder"]))
        layers: list[dict] = []

        def switch_disks() -> None:
            for index, disk in enumerate(self.plan.disks):
                if not disk.created or disk.read_only:
                    continue
                device = self.machine.mmio_devices[index].transport.device  # type: ignore[attr-defined]  # a VirtioMmioSlot
                device.backend.flush()
                device.backend.close()
                layer = folder / f"disk{index}.qcow2"
                try:
                    freeze_overlay(Path(disk.path), layer)
                finally:
                    device.backend = open_disk(disk.path)  # the new overlay (or the old one, on failure)
                info = layer.stat()
                layers.append({"index": index, "path": str(layer), "size": info.st_size, "mtime_ns": info.st_mtime_ns})

        summary = self.machine.snapshot(folder, then=str(message.get("then", "resume")), while_paused=switch_disks,
                                        save_memory=bool(message.get("memory")))
        return {**summary, "layers": layers}

    def stop(self, message: dict) -> dict:
        self.machine.stop(Outcome(0, str(message.get("reason", "stopped by vmctl"))))
        return {"stopping": True}

    def shutdown(self, _: dict) -> dict:
        """Ask the guest to power off through its agent (sync, then the i8042 reset /init's
        `reboot -f` does with reboot=k); without an agent, stop the VM at once."""
        agent = self.machine.agent
        self.shutdown_requested.set()
        if agent is not None and agent.post(SHUTDOWN_SCRIPT):
            return {"graceful": True}
        self.machine.stop(Outcome(0, "stopped by vmctl down (no guest agent to shut down)"))
        return {"graceful": False}

    def exec(self, message: dict) -> dict:
        if self.machine.agent is None:
            raise VmctlError("this machine has no guest agent channel")
        began, exits = time.monotonic(), self.machine.exits
        result = self.machine.agent.exec(str(message["script"]), float(message.get("timeout_seconds", 60)))
        log.info("exec: exit %d in %.1f ms (%d VM exits, %d+%d bytes out, over %s)", result.exit_code,
                 (time.monotonic() - began) * 1000, self.machine.exits - exits, len(result.stdout), len(result.stderr),
                 self.machine.agent.transport)
        return {"exit_code": result.exit_code, "stdout": base64.b64encode(result.stdout).decode(),
                "stderr": base64.b64encode(result.stderr).decode()}

    def take_identity(self) -> None:
        """A clone runs the saved guest, which still believes it is the source: through the
        agent (if it was up when saved) give it its name, address, MAC and the time. The
        machine is ready once that is done, or at once when there is no agent to tell."""
        try:
            # The thread starts with the machine; its agent exists once it is restored.
            if not self.machine.running.wait(120):
                return
            log.info("restored guest running")
            agent = self.machine.agent
            if agent is not None and agent.ready.is_set():
                began, exits = time.monotonic(), self.machine.exits
                result = agent.exec(identity_script(self.restore.hostname, self.net), 60)
                log.info("clone identity told in %.1f ms (%d VM exits)", (time.monotonic() - began) * 1000,
                         self.machine.exits - exits)
                if result.exit_code:
                    log.warning("clone identity: exit %d: %s", result.exit_code, result.stderr.decode(errors="replace"))
        except VmctlError as error:
            log.warning("clone identity: %s", error)
        finally:
            self.ready.set()

    # --- the end ------------------------------------------------------------------------------
    def close(self) -> None:
        for forwarder in self.forwarders:
            forwarder.close()
        if self.net is not None:
            self.net.release()  # idempotent: the net device may have closed it already
        if self.console_server is not None:
            self.console_server.close()
        self.console_file.close()
        if self.plan.ephemeral:  # throwaway guest: its overlays go as soon as it stops
            shutil.rmtree(self.folder / DISKS, ignore_errors=True)


# What the VMM imports only when a request needs it, imported before the sandbox drops to
# `nobody`: afterwards an interpreter under /root cannot read them ("No module named
# 'hashlib'" answered a snapshot request; tests/kvm/test_sandbox.py).
PRELOAD = ("hashlib", "vmctl.vmm.save_restore", "vmctl.snapshot.snapshot_file", "vmctl.snapshot.disk_layers",
           "vmctl.disk.block_backend")


def _agent_console(restore_from: "SnapshotFile | None") -> bool:
    """Whether the machine gets the agent's virtio-console port. A restore follows the
    snapshot (one saved before the port existed restores without it, over the UART)."""
    if restore_from is not None:
        return restore_from.state.get("agent_console", False) is True
    from .agent import console_wanted

    return console_wanted()


def _tree(folder: Path) -> list[Path]:
    """`folder` and everything below it (disks/ holds the overlays a snapshot reopens)."""
    paths = [folder]
    for parent, names, files in os.walk(folder):
        paths += [Path(parent, name) for name in names + files]
    return paths


def _reachable_by_others(folder: Path) -> bool:
    """Every directory above `folder` lets other users through (o+x)."""
    return all(os.stat(parent).st_mode & 0o001 for parent in folder.resolve().parents)


def serve(folder: Path, plan: KvmPlan) -> int:
    process = MachineProcess(folder, plan)
    server = None
    try:
        try:
            machine = process.build()
            server = ControlServer(folder / CONTROL, {"status": process.status, "stop": process.stop,
                                                      "shutdown": process.shutdown, "exec": process.exec,
                                                      "snapshot": process.snapshot})
        except VmctlError as error:
            outcome = Outcome(1, str(error))
        else:
            server.start()
            # SIGTERM (from `vmctl down`'s fallback) ends the guest like a stop request.
            signal.signal(signal.SIGTERM, lambda *_: machine.stop(Outcome(143, "terminated (SIGTERM)")))
            if process.restore:
                threading.Thread(target=process.take_identity, name="identity", daemon=True).start()
            from . import profiling

            profiled = profiling.install()
            try:
                outcome = machine.run()
            except VmctlError as error:
                outcome = Outcome(1, str(error))
            if profiled:
                profiling.dump()
            if process.shutdown_requested.is_set() and not outcome.crashed:
                outcome = Outcome(outcome.exit_code, f"shut down by vmctl down ({outcome.reason})")
    finally:
        if server is not None:
            server.close()
        process.close()
    _write_outcome(folder, outcome, process.started)
    return outcome.exit_code


def identity_script(hostname: str | None, net) -> str:
    """Shell for a restored guest: its new hostname, clock, and (with a network) the MAC and
    address of its own TAP's /30, the host's end as gateway. Terse on purpose: a snapshot
    of a guest whose agent is on the UART (made before the agent's virtio port, or with
    VMCTL_AGENT_CONSOLE=0) gets it there, two port I/O exits per byte. Errors land in the agent's stderr;
    only the last command's status counts. Unused dentries and inodes are dropped: those of the
    transfer share came from the source's file server (the clone's serves its own folder)."""
    lines = [f"B=/bin/busybox;$B date -s @{int(time.time())}>/dev/null;echo 2 >/proc/sys/vm/drop_caches"]
    if hostname:
        lines.append(f"$B hostname {hostname};echo {hostname}>/etc/hostname")
    if net is not None:
        host = net.network
        lines.append(f"if [ -e /sys/class/net/eth0 ];then $B ip link set eth0 address {host.mac};"
                     f"$B ip addr flush dev eth0;$B ip addr add {host.guest_ip}/30 dev eth0;$B ip link set eth0 up;"
                     f"$B ip route replace default via {host.host_ip} dev eth0;fi")
    lines.append("true")
    return "\n".join(lines)


def _write_outcome(folder: Path, outcome: Outcome, started: float) -> None:
    write_json_atomic(folder / OUTCOME, {"exit_code": outcome.exit_code, "reason": outcome.reason,
                                   "crashed": outcome.crashed, "started": started, "ended": time.time()})


def _process_age() -> float:
    """Seconds since this process started (a fork of a launcher: since that fork)."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started = int(stat.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
            return float(uptime.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return float("nan")


def read_plan(path: Path) -> KvmPlan:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise VmctlError(f"{path}: unreadable VMM plan: {error}") from None
    return KvmPlan.from_json(data, str(path))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m vmctl.vmm.daemon FOLDER PLAN_FILE", file=sys.stderr)
        return 2
    folder, plan_file = Path(args[0]), Path(args[1])
    logging.basicConfig(filename=folder / VMM_LOG, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("VMM process %d: %.2f s from its start to main() (interpreter and imports)", os.getpid(), _process_age())
    try:
        plan = read_plan(plan_file)
    except VmctlError as error:
        log.error("%s", error)
        _write_outcome(folder, Outcome(1, str(error)), time.time())
        return 1
    try:
        return serve(folder, plan)
    except Exception:
        log.exception("VMM failed")
        _write_outcome(folder, Outcome(1, "VMM failed: see vmm.log"), time.time())
        return 1


def exit_now(code: int) -> None:
    """End the process once the outcome is written and every disk closed: skipping the
    interpreter's finalisation (module teardown, collecting every object) ends the VMM, and
    so `vmctl rm`/`run`'s wait for it, ~0.1 s sooner (1 s and more under emulation)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code & 0xFF)


if __name__ == "__main__":
    exit_now(main())
