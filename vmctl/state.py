"""Where running machines are recorded: one folder per machine, <state_dir>/machines/<name>/
(its files: vmctl.machine_files), described by machine.json, a `MachineRecord`.

machine.json carries a schema version (vmctl.plans.SCHEMA_VERSION). Version 1 files (a
free-form `spec` dict instead of the typed `plan`) are migrated when read; a newer version
than this vmctl knows is refused with a message saying so, never half-understood.

Every change to the set of machines happens under one exclusive lock (flock on
<state_dir>/machines/.lock), so two `vmctl` commands never race.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TypeVar

from .errors import VmctlError
from .machine_files import CONSOLE, CONSOLE_SOCKET, CONTROL, NETWORK, OUTCOME, RECORD, VMM_LOG, VMM_PLAN
from .paths import state_dir
from .plans import SCHEMA_VERSION, BackendRecord, plan_from_json
from .proc import pid_alive, write_json_atomic

__all__ = ["CONSOLE", "CONSOLE_SOCKET", "CONTROL", "NETWORK", "OUTCOME", "RECORD", "VMM_LOG", "VMM_PLAN",
           "MachineRecord", "StateStore", "pid_alive"]  # pid_alive: moved to vmctl.proc

P = TypeVar("P")


@dataclass
class MachineRecord:
    name: str
    backend: str
    plan: BackendRecord | None = None  # None only while the backend is still creating it
    spec_file: str | None = None
    pid: int | None = None
    created: float = field(default_factory=time.time)
    ephemeral: bool = False
    resources: dict[str, list[str]] = field(default_factory=dict)  # kind -> names to clean up
    # The process the machine must not outlive ({"pid", "start"}: start time tells a reused
    # pid apart); vmctl.reaper removes the machine once it is gone.
    owner: dict | None = None

    def plan_as(self, kind: type[P]) -> P:
        """The plan, known to be of the backend's own type (a backend reading its own record)."""
        if not isinstance(self.plan, kind):
            state = "no plan yet (still starting, or its start failed)" if self.plan is None else \
                f"a {type(self.plan).__name__}"
            raise VmctlError(f"{self.name}: the machine record has {state}, not a {kind.__name__}")
        return self.plan

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, "name": self.name, "backend": self.backend,
                "plan": self.plan.to_json() if self.plan is not None else None,
                "spec_file": self.spec_file, "pid": self.pid, "created": self.created,
                "ephemeral": self.ephemeral, "resources": self.resources, "owner": self.owner}

    @staticmethod
    def from_json(data: object, where: str) -> MachineRecord:
        """A record from machine.json; version 1 files are migrated, newer ones refused."""
        if not isinstance(data, dict):
            raise VmctlError(f"{where}: expected an object, got {type(data).__name__}")
        schema = data.get("schema", 1)
        if schema == 1:
            data = _migrate_v1(data)
        elif schema != SCHEMA_VERSION:
            raise VmctlError(f"{where}: machine record schema {schema!r}, but this vmctl reads schema "
                             f"{SCHEMA_VERSION} (was it written by a newer vmctl?)")
        try:
            name, backend = data["name"], data["backend"]
            if not isinstance(name, str) or not isinstance(backend, str):
                raise VmctlError(f"{where}: name and backend must be strings")
            plan = data.get("plan")
            resources = data.get("resources") or {}
            if not isinstance(resources, dict):
                raise VmctlError(f"{where}: resources: expected an object")
            return MachineRecord(
                name=name, backend=backend,
                plan=plan_from_json(backend, plan, f"{where}: plan") if plan is not None else None,
                spec_file=data.get("spec_file"), pid=data.get("pid"), created=float(data.get("created", 0)),
                ephemeral=bool(data.get("ephemeral", False)),
                resources={str(k): [str(v) for v in values] for k, values in resources.items()},
                owner=_owner(data.get("owner"), where),
            )
        except KeyError as missing:
            raise VmctlError(f"{where}: missing {missing}") from None
        except (TypeError, ValueError) as error:  # e.g. "created": "soon"
            raise VmctlError(f"{where}: {error}") from None


def _owner(value: object, where: str) -> dict | None:
    if value is None:
        return None
    if not (isinstance(value, dict) and isinstance(value.get("pid"), int) and isinstance(value.get("start"), int)):
        raise VmctlError(f"{where}: owner: expected {{\"pid\": int, \"start\": int}}, got {value!r}")
    return {"pid": value["pid"], "start": value["start"]}


def _migrate_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 kept each backend's fields in a free-form `spec` dict: the same keys the typed
    plans use, except the container's network mode and monitor pid (in `resources`)."""
    data = dict(data)
    spec = data.pop("spec", None)
    if not spec:  # a record written before its backend had planned anything
        data["plan"] = None
        return data
    plan = dict(spec)
    if data.get("backend") == "container":
        plan["network_mode"] = (plan.pop("network", None) or {}).get("mode", "none")
        resources = dict(data.get("resources") or {})
        monitor = resources.pop("monitor", None)
        plan["monitor_pid"] = int(monitor[0]) if monitor else None
        data["resources"] = resources
    data["plan"] = plan
    return data


class StateStore:
    def __init__(self, root: Path | None = None, owner: dict | None = None) -> None:
        self.root = (root or state_dir()) / "machines"
        self.owner = owner  # stamped on every machine created through this store

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
        if self.owner is not None and record.owner is None:
            record.owner = dict(self.owner)  # recorded before anything is started
        self.save(record)
        return folder

    def save(self, record: MachineRecord) -> None:
        write_json_atomic(self.folder(record.name) / RECORD, record.to_json(), indent=2)

    def load(self, name: str) -> MachineRecord:
        path = self.folder(name) / RECORD
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            known = ", ".join(self.names()) or "none"
            raise VmctlError(f"no machine named {name!r} (machines: {known})") from None
        except ValueError as error:
            raise VmctlError(f"{path}: unreadable machine record: {error}") from None
        return MachineRecord.from_json(data, str(path))

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

