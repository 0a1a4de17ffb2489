"""The process that owns one running container (like conmon for podman): `python -m
vmctl.backends.container.monitor FOLDER REPORT_FD`.

Why a process: after `<runtime> create` returns, the container's init is nobody's child; the
monitor is a child subreaper, so the init is re-parented to it and its exit status can be
collected. In order it: mounts the overlay root, `create`s the container (stdout/stderr =
console.log), wires the veth into the created container's network namespace, writes
VMCTL-READY, `start`s it and reports "ok PID" (or "error MESSAGE" after undoing everything)
on REPORT_FD to the `vmctl` command waiting in `start`. When the init exits it records
outcome.json and VMCTL-EXIT (as a VM's /init and VMM do), and releases the NAT rule, the
runtime state and cgroup, and the overlay mount. The upper layer stays until `vmctl rm`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from ...errors import VmctlError
from ...guest_contract import EXIT_PREFIX, READY_MARKER_BYTES
from ...proc import write_json_atomic
from ...state import CONSOLE, NETWORK, OUTCOME
from .network import ContainerNetwork
from .overlay_root import Overlay
from .runtime import Runtime, remove_cgroups

PLAN = "container.json"
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class Plan:
    """What the backend decided, written to <machine>/container.json before the monitor starts."""

    machine: str
    container_id: str
    runtime: str
    binary: str
    lower: str
    network: str  # none | isolated | nat

    @staticmethod
    def load(folder: Path) -> "Plan":
        return Plan(**json.loads((folder / PLAN).read_text()))


def paths(folder: Path) -> dict[str, Path]:
    return {"bundle": folder / "bundle", "oci": folder / "oci", "pid": folder / "container.pid",
            "rootfs": folder / "rootfs"}


def release(folder: Path, plan: Plan, network: ContainerNetwork | None = None) -> list[str]:
    """Undo everything a container holds on the host, whatever state it was left in; the
    problems it could not fix (for the caller to report)."""
    where = paths(folder)
    runtime = Runtime(plan.runtime, plan.binary)
    problems: list[str] = []
    if network is not None:
        network.close()
    if where["oci"].exists():
        try:
            runtime.delete(plan.machine, where["oci"], plan.container_id, force=True)
        except VmctlError as error:
            if runtime.state(where["oci"], plan.container_id) is not None:
                problems.append(str(error))
    remove_cgroups(plan.container_id)
    try:
        Overlay(Path(plan.lower), where["rootfs"]).unmount()
    except VmctlError as error:
        problems.append(str(error))
    return problems


def _describe(status: int) -> tuple[int, str]:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        return 128 + number, f"killed by {signal.Signals(number).name}"
    code = os.WEXITSTATUS(status)
    return code, f"exited with status {code}"


MONITOR_PID = "monitor.pid"


def run(folder: Path, report: int) -> int:
    # Written before anything else: a `vmctl up` killed (-9) before it saved the record
    # still leaves a machine that status/rm can find (backend._adopt).
    (folder / MONITOR_PID).write_text(str(os.getpid()))
    plan = Plan.load(folder)
    where = paths(folder)
    runtime = Runtime(plan.runtime, plan.binary)
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    network: ContainerNetwork | None = None
    console = open(folder / CONSOLE, "ab", buffering=0)
    try:
        Overlay(Path(plan.lower), where["rootfs"]).mount()
        runtime.create(plan.machine, where["oci"], plan.container_id, where["bundle"], where["pid"], console)
        pid = int(where["pid"].read_text())
        if plan.network != "none":
            network = ContainerNetwork(plan.network).open(pid)
            write_json_atomic(folder / NETWORK, network.describe())
        console.write(READY_MARKER_BYTES + b"\n")
        runtime.start(plan.machine, where["oci"], plan.container_id)
    except BaseException as error:
        release(folder, plan, network)
        message = str(error) if isinstance(error, VmctlError) else f"{type(error).__name__}: {error}"
        if not message.startswith(f"{plan.machine}: "):
            message = f"{plan.machine}: {message}"
        try:
            os.write(report, f"error {message}\n".encode())
        except OSError:
            print(f"vmctl monitor: {message}", file=sys.stderr)
        return 1
    try:
        os.write(report, f"ok {pid}\n".encode())
        os.close(report)
    except OSError:
        pass  # the command gave up waiting (Ctrl-C): it removes the container itself

    status = 0
    while True:  # reap re-parented processes until the init is among them
        try:
            reaped, status = os.waitpid(-1, 0)
        except ChildProcessError:
            status = -1
            break
        if reaped == pid:
            break
    code, reason = _describe(status) if status >= 0 else (255, "lost track of the container's init")
    console.write(f"{EXIT_PREFIX}{code}\n".encode())
    write_json_atomic(folder / OUTCOME, {"exit_code": code, "reason": reason, "crashed": False})
    for problem in release(folder, plan, network):
        print(f"vmctl monitor: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]), int(sys.argv[2])))
