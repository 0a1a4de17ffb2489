"""The native backend: each machine is a detached `vmctl.vmm.daemon` process on /dev/kvm."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .. import signals
from ..errors import VmctlError
from ..guest_contract import ExecResult, exec_script
from ..machine_files import CONSOLE, CONTROL, VMM_LOG, VMM_PLAN
from ..plans import KvmPlan
from ..proc import allocated_bytes, pid_alive, reap, send_signal, wait_gone, write_json_atomic
from ..spec.model import MachineSpec
from ..state import NETWORK, MachineRecord, StateStore
from ..vmm.control import request
from .base import (
    MachineStatus,
    MarkerScan,
    SshTarget,
    Usage,
    exec_over_ssh,
    exec_with_input,
    process_status,
    read_tail,
    ready_marker,
    setup_failure,
    ssh_target,
)

POLL = 0.05


class KvmBackend:
    name = "kvm"

    def start(self, store: StateStore, spec: MachineSpec, spec_file: str | None) -> MachineRecord:
        from ..host_probe import linux_guest_problem

        problem = linux_guest_problem(spec.kernel)
        if problem:
            raise VmctlError(f"{spec.name}: {problem}")
        record = MachineRecord(name=spec.name, backend=self.name, spec_file=spec_file, ephemeral=spec.ephemeral)
        folder = store.create(record)
        try:
            from .kvm_prepare import prepare  # (qcow2 creation, keys): not for exec, ps, rm

            plan = prepare(spec, folder)
            record.plan = plan
            record.resources = {"disks": [disk.path for disk in plan.disks if disk.created]}
            store.save(record)
            spawn(store, record)
        except BaseException:
            store.delete(spec.name)  # nothing half-made stays behind
            raise
        return record

    def wait_ready(self, store: StateStore, record: MachineRecord, timeout: float) -> float:
        """Ready = the console shows VMCTL-READY (vmctl's /init prints it once mounts, network
        and sshd are up), and the set-up of the command script (the ssh user) is done; a
        guest that exits first is an error, except a short-lived one that exits successfully
        (it ran to completion). A failed set-up is an error with its message. A guest
        restored from a snapshot booted long ago: it is ready once restored and told its new
        identity (the VMM says so)."""
        folder = store.folder(record.name)
        start = time.monotonic()
        console = MarkerScan(folder / CONSOLE, ready_marker(record))
        restored = record.plan_as(KvmPlan).restore is not None
        while time.monotonic() - start < timeout:
            if restored and _restored_ready(folder):
                return time.monotonic() - start
            if not restored and console.found():
                return time.monotonic() - start
            outcome = store.outcome(record.name)
            if outcome is not None:
                if outcome["exit_code"] == 0 and not outcome["crashed"]:
                    return time.monotonic() - start
                failed = setup_failure(read_tail(folder / CONSOLE))
                if failed:
                    raise VmctlError(f"{record.name}: the guest's set-up failed: {failed} (vmctl rm {record.name})")
                raise VmctlError(f"{record.name}: guest ended before it was ready: {outcome['reason']} (vmctl logs {record.name})")
            if not pid_alive(record.pid):
                raise VmctlError(f"{record.name}: the VMM process died before the guest was ready (see {folder / VMM_LOG})")
            signals.check()  # a signal whose exception Python dropped
            time.sleep(POLL)
        raise VmctlError(f"{record.name}: not ready after {timeout:g} s (vmctl logs {record.name})")

    def status(self, store: StateStore, record: MachineRecord) -> MachineStatus:
        return process_status(self.name, store, record, link="tap", running="",
                              gone="the VMM process is gone without an outcome (killed?)")

    def stop(self, store: StateStore, record: MachineRecord, timeout: float) -> None:
        """The guest shuts down through its agent; after `timeout` the VM is stopped, then
        the VMM is killed."""
        if not pid_alive(record.pid):
            reap(record.pid, block=True)
            return
        control = store.folder(record.name) / CONTROL
        try:
            request(control, "shutdown")
        except VmctlError:
            send_signal(record.pid, signal.SIGTERM)
        if wait_gone(record.pid, timeout):
            return
        try:
            request(control, "stop", reason=f"stopped by vmctl down (the guest did not shut down in {timeout:g} s)")
        except VmctlError:
            pass
        if not wait_gone(record.pid, 5):
            send_signal(record.pid, signal.SIGKILL)
            wait_gone(record.pid, 5)

    def exec(self, store: StateStore, record: MachineRecord, command: list[str], timeout: float,
             stdin: bytes | None = None) -> ExecResult:
        """Through SSH (paramiko) when the machine has a network and its sshd answers;
        otherwise through the guest agent on COM2."""
        if not pid_alive(record.pid) or store.outcome(record.name) is not None:
            raise VmctlError(f"{record.name}: not running")
        script = exec_script(command, record.plan_as(KvmPlan).environment)
        over_ssh = exec_over_ssh(store, record, script, timeout, stdin)
        if over_ssh is not None:
            return over_ssh

        def agent(text: str) -> ExecResult:
            answer = request(store.folder(record.name) / CONTROL, "exec", timeout=timeout + 5, script=text,
                             timeout_seconds=timeout)
            return ExecResult(answer["exit_code"], base64.b64decode(answer["stdout"]), base64.b64decode(answer["stderr"]))

        return exec_with_input(agent, script, stdin)

    def ssh_target(self, store: StateStore, record: MachineRecord, probe: bool = True) -> SshTarget | None:
        return ssh_target(store, record, probe)

    def usage(self, store: StateStore, record: MachineRecord) -> Usage:
        """The VMM process (guest RAM it touched included) and the machine's qcow2 overlays."""
        pids = (record.pid,) if pid_alive(record.pid) else ()
        return Usage(pids, allocated_bytes(store.folder(record.name) / "disks"))

    def restart(self, store: StateStore, record: MachineRecord) -> None:
        from .kvm_snapshot import restart  # it builds on this module (spawn)

        restart(store, record)

    def remove(self, store: StateStore, record: MachineRecord) -> None:
        self.stop(store, record, timeout=5)
        if (store.folder(record.name) / NETWORK).exists():  # even if network.json is truncated
            from ..net.host import sweep_stale_rules

            sweep_stale_rules()  # the NAT rule of a VMM killed with -9 (its TAP is gone with it)
        store.delete(record.name)



def spawn(store: StateStore, record: MachineRecord) -> None:
    """Start the machine's VMM daemon, detached, on its recorded plan (handed to it as a file):
    forked by the pre-initialised launcher when $VMCTL_LAUNCHER asks for one (vmctl.launcher;
    it reaps the daemon), else as a new interpreter."""
    from ..launcher.client import spawn_detached

    folder = store.folder(record.name)
    write_json_atomic(folder / VMM_PLAN, record.plan_as(KvmPlan).to_json(), indent=2)
    argv = [str(folder), str(folder / VMM_PLAN)]
    with open(folder / VMM_LOG, "ab") as log, open(os.devnull, "rb") as null:
        pid = spawn_detached("vmctl.vmm.daemon", argv, (null.fileno(), log.fileno(), log.fileno()))
        if pid is None:
            pid = subprocess.Popen(
                [sys.executable, "-m", "vmctl.vmm.daemon", *argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
            ).pid
    record.pid = pid
    store.save(record)


def _restored_ready(folder: Path) -> bool:
    if not (folder / CONTROL).exists():
        return False
    try:
        return bool(request(folder / CONTROL, "status", timeout=2).get("ready"))
    except VmctlError:
        return False
