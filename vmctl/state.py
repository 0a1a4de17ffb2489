"""Where running machines are recorded: one folder per machine under the state directory.

    <state_dir>/machines/<name>/machine.json   what was started, by whom, with what resources
    <state_dir>/machines/<name>/control.sock   the VMM's control socket (JSON lines)
    <state_dir>/machines/<name>/console.log    the guest console
    <state_dir>/machines/<name>/console.sock   the live console (`vmctl console`)
    <state_dir>/machines/<name>/network.json   the machine's TAP and addresses (written by the VMM)
    <state_dir>/machines/<name>/ssh/           the machine's own SSH key pair
    <state_dir>/machines/<name>/outcome.json   how it ended (written by the VMM on exit)
    <state_dir>/machines/<name>/disks/         per-machine overlays

Every change to the set of machines happens under one exclusive lock (flock on
<state_dir>/machines/.lock), so two `vmctl` commands never race.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import VmctlError
from .paths import state_dir
from .proc import pid_alive, write_json_atomic

__all__ = ["MachineRecord", "StateStore", "pid_alive"]  # pid_alive: moved to vmctl.proc

RECORD = "machine.json"
OUTCOME = "outcome.json"
CONSOLE = "console.log"
CONTROL = "control.sock"
CONSOLE_SOCKET = "console.sock"
NETWORK = "network.json"
VMM_LOG = "vmm.log"


@dataclass
class MachineRecord:
    name: str
    backend: str
    spec: dict  # the machine's spec, as given (JSON-safe)
    spec_file: str | None = None
    pid: int | None = None
    created: float = field(default_factory=time.time)
    ephemeral: bool = False
    resources: dict[str, list[str]] = field(default_factory=dict)  # kind -> names to clean up


class StateStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or state_dir()) / "machines"

    @contextlib.contextmanager
    def locked(self) -> Iterator["StateStore"]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def folder(self, name: str) -> Path:
        return self.root / name

    def exists(self, name: str) -> bool:
        return (self.folder(name) / RECORD).exists()

    def create(self, record: MachineRecord) -> Path:
        folder = self.folder(record.name)
        if self.exists(record.name):
            raise VmctlError(f"machine {record.name!r} already exists (vmctl rm {record.name} first)")
        folder.mkdir(parents=True, exist_ok=True)
        self.save(record)
        return folder

    def save(self, record: MachineRecord) -> None:
        write_json_atomic(self.folder(record.name) / RECORD, asdict(record), indent=2)

    def load(self, name: str) -> MachineRecord:
        path = self.folder(name) / RECORD
        try:
            return MachineRecord(**json.loads(path.read_text()))
        except FileNotFoundError:
            known = ", ".join(self.names()) or "none"
            raise VmctlError(f"no machine named {name!r} (machines: {known})") from None
        except (ValueError, TypeError) as error:
            raise VmctlError(f"{path}: unreadable machine record: {error}") from None

    def names(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / RECORD).exists())

    def outcome(self, name: str) -> dict | None:
        try:
            return json.loads((self.folder(name) / OUTCOME).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def network(self, name: str) -> dict | None:
        """The machine's TAP and addresses, once its VMM has set them up."""
        try:
            return json.loads((self.folder(name) / NETWORK).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def delete(self, name: str) -> None:
        shutil.rmtree(self.folder(name), ignore_errors=True)

