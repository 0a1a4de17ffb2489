"""What each backend records about a machine: one frozen dataclass per backend, with JSON.

- `KvmPlan`: everything the native VMM process (`vmctl.vmm.daemon`) is started with;
- `LibvirtRecord`: where the libvirt domain lives and how to reach its console and agent;
- `ContainerRecord`: the OCI runtime, container id and monitor process of a container.

`MachineRecord.plan` (vmctl.state) holds one of them; the backend that made it is the only
code that reads its backend-specific fields. What every backend shares (cpus, memory,
environment, ssh access) has the same name in all three, so `vmctl ps` and `exec` read it
without knowing the backend.

JSON: `to_json()` gives plain data; `plan_from_json(backend, data, where)` checks every
field's type and names the one that is wrong (`where` is the file, e.g. machine.json: plan).
The record's schema version is `SCHEMA_VERSION` (vmctl.state writes it next to the plan).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import VmctlError
from .fs.cache import MODES as CACHE_MODES

SCHEMA_VERSION = 2  # 1: a free-form `spec` dict per backend (read and migrated by vmctl.state)

# --- typed JSON reading -------------------------------------------------------------------
_REQUIRED = object()


class _Fields:
    """Reads typed fields out of one JSON object; errors name `where` and the field."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, Mapping):
            raise VmctlError(f"{where}: expected an object, got {type(data).__name__}")
        self.data: Mapping[str, object] = data
        self.where = where

    def _value(self, name: str, default: object) -> object:
        value = self.data.get(name, default)
        if value is _REQUIRED:
            raise VmctlError(f"{self.where}.{name}: missing")
        return value

    def _fail(self, name: str, expected: str, value: object) -> VmctlError:
        return VmctlError(f"{self.where}.{name}: expected {expected}, got {value!r}")

    def text(self, name: str, default: object = _REQUIRED) -> str:
        value = self._value(name, default)
        if not isinstance(value, str):
            raise self._fail(name, "a string", value)
        return value

    def opt_text(self, name: str) -> str | None:
        value = self.data.get(name)
        if value is not None and not isinstance(value, str):
            raise self._fail(name, "a string or null", value)
        return value

    def integer(self, name: str) -> int:
        value = self._value(name, _REQUIRED)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._fail(name, "an integer", value)
        return value

    def opt_integer(self, name: str) -> int | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._fail(name, "an integer or null", value)
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if not isinstance(value, bool):
            raise self._fail(name, "true or false", value)
        return value

    def texts(self, name: str) -> tuple[str, ...]:
        value = self.data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self._fail(name, "a list of strings", value)
        return tuple(value)

    def environment(self, name: str = "environment") -> dict[str, str]:
        value = self.data.get(name, {})
        if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise self._fail(name, "an object of strings", value)
        return dict(value)

    def items(self, name: str) -> list[object]:
        value = self.data.get(name, [])
        if not isinstance(value, list):
            raise self._fail(name, "a list", value)
        return value



# --- shared parts -------------------------------------------------------------------------
@dataclass(frozen=True)
class SshAccess:
    """How `vmctl ssh`/`exec` log in: the guest user and the private key vmctl made (if any)."""

    user: str = "root"
    key: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"user": self.user, "key": self.key}

    @staticmethod
    def from_json(data: object, where: str) -> SshAccess:
        f = _Fields(data, where)
        return SshAccess(f.text("user", "root"), f.opt_text("key"))


@dataclass(frozen=True)
class DiskPlan:
    """One virtio-blk disk of a native VM, in slot order (vda, vdb...)."""

    path: str
    read_only: bool
    created: bool  # made for this machine (an overlay or a blank disk): deleted with it

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "read_only": self.read_only, "created": self.created}

    @staticmethod
    def from_json(data: object, where: str) -> DiskPlan:
        f = _Fields(data, where)
        return DiskPlan(f.text("path"), f.flag("read_only", False), f.flag("created", False))


@dataclass(frozen=True)
class ForwardPlan:
    host_port: int
    guest_port: int
    protocol: str  # tcp | udp

    def to_json(self) -> list[Any]:
        return [self.host_port, self.guest_port, self.protocol]

    @staticmethod
    def from_json(data: object, where: str) -> ForwardPlan:
        if not (isinstance(data, list) and len(data) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in data[:2])
                and data[2] in ("tcp", "udp")):
            raise VmctlError(f"{where}: expected [host port, guest port, \"tcp\"|\"udp\"], got {data!r}")
        return ForwardPlan(data[0], data[1], data[2])


@dataclass(frozen=True)
class NetworkPlan:
    mode: str = "none"  # none | isolated | nat
    mac: str | None = None
    forwards: tuple[ForwardPlan, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "mac": self.mac, "forwards": [f.to_json() for f in self.forwards]}

    @staticmethod
    def from_json(data: object, where: str) -> NetworkPlan:
        f = _Fields(data, where)
        mode = f.text("mode", "none")
        if mode not in ("none", "isolated", "nat"):
            raise VmctlError(f"{where}.mode: expected none, isolated or nat, got {mode!r}")
        forwards = tuple(ForwardPlan.from_json(item, f"{where}.forwards[{i}]") for i, item in enumerate(f.items("forwards")))
        return NetworkPlan(mode, f.opt_text("mac"), forwards)


@dataclass(frozen=True)
class RestorePlan:
    """Start from a memory snapshot instead of booting: the snapshot's folder, and the
    hostname the restored guest is told (a clone's own name)."""

    snapshot: str
    hostname: str

    def to_json(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "hostname": self.hostname}

    @staticmethod
    def from_json(data: object, where: str) -> RestorePlan:
        f = _Fields(data, where)
        return RestorePlan(f.text("snapshot"), f.text("hostname"))


# --- one record per backend ---------------------------------------------------------------
@dataclass(frozen=True)
class MountPlan:
    """A host folder served to the guest by a virtio-fs device; /init mounts TAG at `guest`."""

    host: str
    guest: str
    tag: str
    read_only: bool = False
    cache: str = "auto"  # vmctl.fs.cache mode

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "guest": self.guest, "tag": self.tag, "read_only": self.read_only,
                "cache": self.cache}

    @staticmethod
    def from_json(data: object, where: str) -> MountPlan:
        f = _Fields(data, where)
        cache = f.text("cache", "auto")  # plans written before cache modes: the default
        if cache not in CACHE_MODES:
            raise VmctlError(f"{where}.cache: unknown cache mode {cache!r}")
        return MountPlan(f.text("host"), f.text("guest"), f.text("tag"), f.flag("read_only", False), cache)


@dataclass(frozen=True)
class PmemPlan:
    """A read-only raw ext4 served as virtio-pmem; /init mounts /dev/pmemN at `guest` (ro,dax)."""

    path: str
    guest: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "guest": self.guest}

    @staticmethod
    def from_json(data: object, where: str) -> PmemPlan:
        f = _Fields(data, where)
        return PmemPlan(f.text("path"), f.text("guest"))


@dataclass(frozen=True)
class KvmPlan:
    """What the native VMM process runs: `python -m vmctl.vmm.daemon FOLDER PLAN_FILE`."""

    backend: ClassVar[str] = "kvm"

    cpus: int
    memory: int  # bytes
    kernel: str
    cmdline: str
    initrd: str | None = None
    image: str = "busybox"
    command: tuple[str, ...] = ()
    environment: dict[str, str] = field(default_factory=dict)
    disks: tuple[DiskPlan, ...] = ()
    mounts: tuple[MountPlan, ...] = ()  # virtio-fs shares (the `mounts:` folders, then the transfer share)
    pmem: tuple[PmemPlan, ...] = ()  # virtio-pmem bases, in /dev/pmemN order
    network: NetworkPlan = NetworkPlan()
    ssh: SshAccess = SshAccess()
    ephemeral: bool = False  # the VMM deletes the machine's overlays as soon as the guest ends
    memory_merge: bool = False  # guest RAM offered to KSM (MADV_MERGEABLE)
    restore: RestorePlan | None = None  # continue a memory snapshot instead of booting
    snapshot: str | None = None  # the snapshot this machine was cloned from

    def to_json(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "memory": self.memory, "image": self.image, "kernel": self.kernel,
                "initrd": self.initrd, "cmdline": self.cmdline, "command": list(self.command),
                "environment": dict(self.environment), "disks": [d.to_json() for d in self.disks],
                "mounts": [m.to_json() for m in self.mounts], "pmem": [p.to_json() for p in self.pmem],
                "network": self.network.to_json(), "ssh": self.ssh.to_json(), "ephemeral": self.ephemeral,
                "memory_merge": self.memory_merge, "restore": self.restore.to_json() if self.restore else None,
                "snapshot": self.snapshot}

    @staticmethod
    def from_json(data: object, where: str) -> KvmPlan:
        f = _Fields(data, where)
        restore = f.data.get("restore")
        return KvmPlan(
            cpus=f.integer("cpus"), memory=f.integer("memory"), kernel=f.text("kernel"), cmdline=f.text("cmdline"),
            initrd=f.opt_text("initrd"), image=f.text("image", "busybox"), command=f.texts("command"),
            environment=f.environment(),
            disks=tuple(DiskPlan.from_json(d, f"{where}.disks[{i}]") for i, d in enumerate(f.items("disks"))),
            mounts=tuple(MountPlan.from_json(m, f"{where}.mounts[{i}]") for i, m in enumerate(f.items("mounts"))),
            pmem=tuple(PmemPlan.from_json(p, f"{where}.pmem[{i}]") for i, p in enumerate(f.items("pmem"))),
            network=NetworkPlan.from_json(f.data.get("network", {}), f"{where}.network"),
            ssh=SshAccess.from_json(f.data.get("ssh") or {}, f"{where}.ssh"),
            ephemeral=f.flag("ephemeral", False), memory_merge=f.flag("memory_merge", False),
            restore=RestorePlan.from_json(restore, f"{where}.restore") if restore is not None else None,
            snapshot=f.opt_text("snapshot"),
        )


@dataclass(frozen=True)
class LibvirtRecord:
    """A machine run by libvirt: its connection, domain and the paths vmctl reads it through."""

    backend: ClassVar[str] = "libvirt"

    cpus: int
    memory: int
    uri: str
    domain: str  # vmctl-<name>
    uuid: str
    remote: bool = False
    persistent: bool = True  # defined (survives a stop) rather than transient
    environment: dict[str, str] = field(default_factory=dict)
    console: str | None = None  # the console log (a path on the libvirt host)
    agent_socket: str | None = None  # the guest agent's COM2 as a unix socket (local URIs; the fallback)
    agent_console: str | None = None  # its virtio console (guest hvc0) as a unix socket (None: records from before)
    ssh: SshAccess | None = None  # on vmctl's own network: how to log in
    image: str | None = None  # the reference image profile (None: records from before it was kept)

    def to_json(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "memory": self.memory, "uri": self.uri, "domain": self.domain, "uuid": self.uuid,
                "image": self.image,
                "remote": self.remote, "persistent": self.persistent, "environment": dict(self.environment),
                "console": self.console, "agent_socket": self.agent_socket, "agent_console": self.agent_console,
                "ssh": self.ssh.to_json() if self.ssh else None}

    @staticmethod
    def from_json(data: object, where: str) -> LibvirtRecord:
        f = _Fields(data, where)
        ssh = f.data.get("ssh")
        return LibvirtRecord(
            cpus=f.integer("cpus"), memory=f.integer("memory"), uri=f.text("uri"), domain=f.text("domain"), uuid=f.text("uuid"),
            remote=f.flag("remote", False), persistent=f.flag("persistent", True), environment=f.environment(),
            console=f.opt_text("console"), agent_socket=f.opt_text("agent_socket"), agent_console=f.opt_text("agent_console"),
            ssh=SshAccess.from_json(ssh, f"{where}.ssh") if ssh is not None else None, image=f.opt_text("image"),
        )


@dataclass(frozen=True)
class ContainerRecord:
    """A machine run as an OCI container by crun/runc, watched by vmctl's monitor process."""

    backend: ClassVar[str] = "container"

    cpus: int
    memory: int
    runtime: str  # crun | runc
    container_id: str
    image: str = "busybox"
    command: tuple[str, ...] = ()
    environment: dict[str, str] = field(default_factory=dict)
    network_mode: str = "none"
    monitor_pid: int | None = None  # vmctl's monitor (writes the outcome, releases the mounts)
    # Frozen upper layers (disk snapshots) stacked above the image, top first: each one a
    # snapshot's `upper` folder, or one the machine kept when its snapshot was deleted.
    layers: tuple[str, ...] = ()

    @property
    def ssh(self) -> SshAccess | None:
        return None  # containers are reached through `<runtime> exec`

    def to_json(self) -> dict[str, Any]:
        return {"cpus": self.cpus, "memory": self.memory, "runtime": self.runtime, "container_id": self.container_id,
                "image": self.image, "command": list(self.command), "environment": dict(self.environment),
                "network_mode": self.network_mode, "monitor_pid": self.monitor_pid, "layers": list(self.layers)}

    @staticmethod
    def from_json(data: object, where: str) -> ContainerRecord:
        f = _Fields(data, where)
        return ContainerRecord(
            cpus=f.integer("cpus"), memory=f.integer("memory"), runtime=f.text("runtime"), container_id=f.text("container_id"),
            image=f.text("image", "busybox"), command=f.texts("command"), environment=f.environment(),
            network_mode=f.text("network_mode", "none"), monitor_pid=f.opt_integer("monitor_pid"),
            layers=f.texts("layers"),
        )


BackendRecord = KvmPlan | LibvirtRecord | ContainerRecord
RECORD_TYPES: dict[str, type[KvmPlan] | type[LibvirtRecord] | type[ContainerRecord]] = {
    cls.backend: cls for cls in (KvmPlan, LibvirtRecord, ContainerRecord)
}


def plan_from_json(backend: str, data: object, where: str) -> BackendRecord:
    """The typed record of `backend` from its JSON; a VmctlError names the bad field."""
    cls = RECORD_TYPES.get(backend)
    if cls is None:
        raise VmctlError(f"{where}: unknown backend {backend!r} (one of: {', '.join(RECORD_TYPES)})")
    return cls.from_json(data, where)
