"""The native backend: each machine is a detached `vmctl.vmm.daemon` process on /dev/kvm."""

from __future__ import annotations

import base64
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

from ..errors import VmctlError
from ..spec.model import MachineSpec
from ..state import CONSOLE, CONTROL, VMM_LOG, MachineRecord, StateStore, pid_alive
from ..vmm.agent import ExecResult
from ..vmm.control import request
from ..vmm.machine import DEFAULT_CMDLINE, MachineConfig
from .base import MachineStatus

READY_MARKER = b"VMCTL-READY"
POLL = 0.05


def spec_to_record_dict(spec: MachineSpec) -> dict:
    """The parts of a spec the VMM process needs, JSON-safe."""
    return {
        "cpus": spec.cpus,
        "memory": spec.memory,
        "kernel": str(spec.kernel) if spec.kernel else None,
        "initrd": str(spec.initrd) if spec.initrd else None,
        "cmdline": spec.cmdline,
        "command": list(spec.command),
        "environment": dict(spec.environment),
    }


def command_cmdline(command: list[str], environment: dict[str, str]) -> str:
    """`vmctl.cmd=<base64 of a shell command>`, which the reference /init runs (docs/images.md)."""
    if not command:
        return ""
    exports = "".join(f"export {name}={shlex.quote(value)}; " for name, value in environment.items())
    script = exports + shlex.join(command)
    return "vmctl.cmd=" + base64.b64encode(script.encode()).decode()


def default_images() -> tuple[Path, Path]:
    try:
        from ..images import locate
    except ImportError:
        raise VmctlError("no kernel given and the image builder is not available") from None
    found = locate()
    if not found.bzimage.exists():
        raise VmctlError(f"no kernel given and the reference kernel is not built ({found.bzimage}): run `vmctl image build`")
    return found.bzimage, found.initramfs


def machine_config(record: MachineRecord, console: BinaryIO) -> MachineConfig:
    spec = record.spec
    kernel, initrd = spec["kernel"], spec["initrd"]
    if kernel is None:
        default_kernel, default_initrd = default_images()
        kernel = default_kernel
        initrd = initrd or default_initrd
    cmdline = " ".join(filter(None, [spec["cmdline"] or DEFAULT_CMDLINE, command_cmdline(spec["command"], spec["environment"])]))
    return MachineConfig(
        kernel=Path(kernel), initrd=Path(initrd) if initrd else None, cmdline=cmdline,
        cpus=spec["cpus"], memory=spec["memory"], console_sinks=[console], agent=True,
    )


class KvmBackend:
    name = "kvm"

    def start(self, store: StateStore, spec: MachineSpec, spec_file: str | None) -> MachineRecord:
        record = MachineRecord(name=spec.name, backend=self.name, spec=spec_to_record_dict(spec),
                               spec_file=spec_file, ephemeral=spec.ephemeral)
        folder = store.create(record)
        try:
            with open(folder / VMM_LOG, "ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "vmctl.vmm.daemon", str(folder)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
                )
            record.pid = process.pid
            store.save(record)
        except BaseException:
            store.delete(spec.name)  # nothing half-made stays behind
            raise
        return record

    def wait_ready(self, store: StateStore, record: MachineRecord, timeout: float) -> float:
        """Ready = the console shows VMCTL-READY; a guest that exits first is an error,
        except a short-lived one that exits successfully (it ran to completion)."""
        folder = store.folder(record.name)
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            console = folder / CONSOLE
            if console.exists() and READY_MARKER in console.read_bytes():
                return time.monotonic() - start
            outcome = store.outcome(record.name)
            if outcome is not None:
                if outcome["exit_code"] == 0 and not outcome["crashed"]:
                    return time.monotonic() - start
                raise VmctlError(f"{record.name}: guest ended before it was ready: {outcome['reason']} (vmctl logs {record.name})")
            if not pid_alive(record.pid):
                raise VmctlError(f"{record.name}: the VMM process died before the guest was ready (see {folder / VMM_LOG})")
            time.sleep(POLL)
        raise VmctlError(f"{record.name}: not ready after {timeout:g} s (vmctl logs {record.name})")

    def status(self, store: StateStore, record: MachineRecord) -> MachineStatus:
        outcome = store.outcome(record.name)
        if outcome is not None:
            state = "crashed" if outcome["crashed"] else "exited"
            return MachineStatus(record.name, self.name, state, None, outcome["reason"], outcome["exit_code"])
        if pid_alive(record.pid):
            return MachineStatus(record.name, self.name, "running", record.pid)
        return MachineStatus(record.name, self.name, "dead", record.pid, "the VMM process is gone without an outcome (killed?)")

    def stop(self, store: StateStore, record: MachineRecord, timeout: float) -> None:
        if not pid_alive(record.pid):
            return
        try:
            request(store.folder(record.name) / CONTROL, "stop", reason="stopped by vmctl down")
        except VmctlError:
            _signal(record.pid, signal.SIGTERM)
        if not _wait_gone(record.pid, timeout):
            _signal(record.pid, signal.SIGKILL)
            _wait_gone(record.pid, 5)

    def exec(self, store: StateStore, record: MachineRecord, command: list[str], timeout: float) -> ExecResult:
        if not pid_alive(record.pid):
            raise VmctlError(f"{record.name}: not running")
        script = "".join(f"export {k}={shlex.quote(v)}; " for k, v in record.spec["environment"].items()) + shlex.join(command)
        answer = request(store.folder(record.name) / CONTROL, "exec", timeout=timeout + 5, script=script, timeout_seconds=timeout)
        return ExecResult(answer["exit_code"], base64.b64decode(answer["stdout"]), base64.b64decode(answer["stderr"]))

    def remove(self, store: StateStore, record: MachineRecord) -> None:
        self.stop(store, record, timeout=5)
        store.delete(record.name)


def _signal(pid: int | None, sig: int) -> None:
    if pid:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pid: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            _reap(pid)
            return True
        _reap(pid)
        time.sleep(POLL)
    return not pid_alive(pid)


def _reap(pid: int | None) -> None:
    """Collect the exit status if the VMM is our own child (so it does not linger as a zombie)."""
    if pid:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
