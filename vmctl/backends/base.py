"""What every backend provides to the lifecycle commands."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

from ..errors import VmctlError
from ..guest_contract import ExecResult
from ..proc import pid_alive
from ..spec.model import MachineSpec
from ..state import MachineRecord, StateStore


@dataclass(frozen=True)
class MachineStatus:
    name: str
    backend: str
    state: str  # running | exited | crashed | dead | created
    pid: int | None
    detail: str = ""  # how it ended, or why it is dead
    exit_code: int | None = None


def ended_status(backend: str, store: StateStore, record: MachineRecord) -> MachineStatus | None:
    """The machine's status from its outcome file (every backend writes one when it ends)."""
    outcome = store.outcome(record.name)
    if outcome is None:
        return None
    state = "crashed" if outcome.get("crashed") else "exited"
    if (store.folder(record.name) / "stopped").exists():  # `vmctl stop`: kept, to be started again
        state = "stopped"
    return MachineStatus(record.name, backend, state, None, outcome["reason"], outcome["exit_code"])


def process_status(
    backend: str, store: StateStore, record: MachineRecord, link: str, running: str, gone: str,
) -> MachineStatus:
    """Status of a machine run by a local process (`record.pid`): its outcome once it ended;
    else running while the process lives (detail: `running`, then the guest address on the
    network's `link` device when it has one); else dead, because `gone`."""
    ended = ended_status(backend, store, record)
    if ended is not None:
        return ended
    if pid_alive(record.pid):
        network = store.network(record.name)
        where = f"{network['guest_ip']} ({network[link]})" if network else ""
        ports = ", ".join(f"127.0.0.1:{h}->{g}/{p}" for h, g, p in (network or {}).get("forwards", []))
        where = f"{where}, {ports}" if ports else where
        detail = ", ".join(part for part in (running, where) if part)
        return MachineStatus(record.name, backend, "running", record.pid, detail)
    # A VMM writes its outcome and then exits: that may have happened between the two checks
    # above, so a process found gone is only dead if there is still no outcome.
    return ended_status(backend, store, record) or MachineStatus(record.name, backend, "dead", record.pid, gone)


def ready_marker(record: MachineRecord) -> bytes:
    """What `up` waits for on a VM's console: VMCTL-READY from /init, or the end of the
    command script's set-up (the ssh user) when it has one (guest_contract.user_setup)."""
    from ..guest_contract import READY_MARKER_BYTES, SETUP_DONE, has_setup

    access = record.plan.ssh if record.plan is not None else None
    user = access.user if access is not None else "root"
    return SETUP_DONE.encode() if has_setup(user) else READY_MARKER_BYTES


def setup_failure(console: bytes) -> str | None:
    """The message of a VMCTL-SETUP-FAILED line on the console, if the set-up failed."""
    from ..guest_contract import SETUP_FAILED

    marker = SETUP_FAILED.encode() + b" "
    at = console.rfind(marker)
    if at < 0:
        return None
    return console[at + len(marker):].split(b"\n", 1)[0].rstrip(b"\r").decode(errors="replace")


def read_tail(path: Path, size: int = 65536) -> bytes:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - size))
            return handle.read()
    except FileNotFoundError:
        return b""


class MarkerScan:
    """Looks for `marker` in a growing log file, reading each byte about once per call.

    Keeps the last len(marker)-1 bytes between calls, so a marker split across two reads
    is still found.
    """

    def __init__(self, path: Path, marker: bytes) -> None:
        self.path = path
        self.marker = marker
        self._offset = 0
        self._tail = b""

    def found(self) -> bool:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return False
        self._offset += len(data)
        window = self._tail + data
        if self.marker in window:
            return True
        self._tail = window[-(len(self.marker) - 1):] if len(self.marker) > 1 else b""
        return False


class SshTarget(NamedTuple):
    host: str
    user: str
    key: Path | None


def ssh_target(store: StateStore, record: MachineRecord, probe: bool = True) -> SshTarget | None:
    """(guest IP, user, private key) of a machine on vmctl's network (its network.json) whose
    sshd accepts connections (unless `probe` is False); None otherwise."""
    from ..ssh import port_open

    network = store.network(record.name)
    access = record.plan.ssh if record.plan is not None else None
    if network is None or access is None or (probe and not port_open(network["guest_ip"], 22)):
        return None
    return SshTarget(network["guest_ip"], access.user, Path(access.key) if access.key else None)


def exec_over_ssh(store: StateStore, record: MachineRecord, script: str, timeout: float,
                  stdin: bytes | None = None) -> ExecResult | None:
    """Run `script` through SSH when the machine is on vmctl's network and its sshd answers;
    None when it is not (the caller falls back to its guest agent)."""
    target = ssh_target(store, record)
    if target is None:
        return None
    from ..ssh import exec_ssh

    host, user, key = target
    return exec_ssh(host, user, key, script, timeout, stdin=stdin)


STDIN_CHUNK = 24 * 1024  # base64 twice (here and on the agent's line) stays under the UART's 64 KiB buffer


def exec_with_input(run: Callable[[str], ExecResult], script: str, stdin: bytes | None) -> ExecResult:
    """`exec -i` through a channel that cannot stream (the guest agent): the bytes go to a file
    in the guest's /tmp first, then the script reads it as its stdin. Without input the
    script's stdin is /dev/null (the agent's own rule)."""
    if stdin is None:
        return run(script)
    path = f"/tmp/.vmctl-stdin-{os.urandom(6).hex()}"  # (uuid: slow to import)
    for start in range(0, max(len(stdin), 1), STDIN_CHUNK):
        chunk = base64.b64encode(stdin[start:start + STDIN_CHUNK]).decode()
        written = run(f"echo '{chunk}' | /bin/busybox base64 -d >> {path}")
        if written.exit_code:
            raise VmctlError(f"cannot pass stdin to the guest: {written.stderr.decode(errors='replace').strip()}")
    return run(f"({script}) < {path}; s=$?; rm -f {path}; exit $s")


@dataclass(frozen=True)
class Usage:
    """What a running machine costs the host: its processes (for PSS) and the bytes its own
    writes allocated (qcow2 overlay, overlayfs upper dir). `vmctl compare` reads these."""

    pids: tuple[int, ...]
    disk_bytes: int
    helper_pids: tuple[int, ...] = ()  # vmctl's own processes among `pids` (the container monitor)
    runner: str | None = None  # what runs the machine when it is not vmctl's VMM (crun, runc, qemu)


class Backend(Protocol):
    name: str

    def start(self, store: StateStore, spec: MachineSpec, spec_file: str | None) -> MachineRecord:
        """Prepare the machine's resources and start it detached; return its record."""

    def wait_ready(self, store: StateStore, record: MachineRecord, timeout: float) -> float:
        """Block until the guest is ready; returns the seconds it took. Raises on failure."""

    def status(self, store: StateStore, record: MachineRecord) -> MachineStatus: ...

    def stop(self, store: StateStore, record: MachineRecord, timeout: float) -> None:
        """Ask the machine to stop, then kill it after `timeout` seconds."""

    def exec(self, store: StateStore, record: MachineRecord, command: list[str], timeout: float,
             stdin: bytes | None = None) -> ExecResult:
        """Run a command in the guest; its exit code and output. Its stdin is `stdin` (`exec -i`),
        else /dev/null."""

    def remove(self, store: StateStore, record: MachineRecord) -> None:
        """Stop it if needed and release everything it holds (processes, disks, taps, state)."""

    def restart(self, store: StateStore, record: MachineRecord) -> None:
        """`vmctl start`: a stopped machine again, on its own disks (VmctlError where the
        backend cannot)."""

    def ssh_target(self, store: StateStore, record: MachineRecord, probe: bool = True) -> SshTarget | None:
        """Where `vmctl ssh` connects: a machine on vmctl's network with a key; None otherwise
        (`probe`: only when its sshd answers)."""

    def usage(self, store: StateStore, record: MachineRecord) -> Usage:
        """Host processes and disk bytes of a running machine (local machines only)."""
