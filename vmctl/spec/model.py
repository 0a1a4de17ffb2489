"""What a machine spec holds once parsed and validated: plain typed dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("kvm", "libvirt", "container")
NETWORK_MODES = ("none", "nat", "isolated")
IMAGE_PROFILES = ("busybox", "debian", "bench")  # reference images (vmctl image build [--profile])
LIBVIRT_DOMAIN_TYPES = ("kvm", "qemu")


@dataclass(frozen=True)
class DiskSpec:
    image: Path | None  # base image (qcow2 or raw); None: a new blank disk of `size`
    size: int | None = None  # grow the overlay to this virtual size (bytes)
    read_only: bool = False
    overlay: bool = True  # write to a per-machine qcow2 overlay, never to the base


@dataclass(frozen=True)
class PortForward:
    host_port: int
    guest_port: int
    protocol: str = "tcp"


@dataclass(frozen=True)
class NetworkSpec:
    mode: str = "none"
    mac: str | None = None  # generated per machine when absent
    forwards: tuple[PortForward, ...] = ()


@dataclass(frozen=True)
class MountSpec:
    """A host folder shared with the guest (virtio-fs, 9p under libvirt, a bind mount in a container)."""

    host: Path  # an existing directory, absolute
    guest: str  # absolute path in the guest
    read_only: bool = False
    cache: str = "auto"  # auto | always | never: what the guest may cache (vmctl.fs.cache; virtio-fs only)

    @property
    def tag(self) -> str:
        """The name the guest mounts it by (virtio-fs tag / 9p mount tag): at most 36 bytes."""
        import hashlib

        return "vmctl-" + hashlib.sha256(f"{self.host}\0{self.guest}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PmemSpec:
    """A read-only raw ext4 image shared with the guest as virtio-pmem and mounted `-o ro,dax`
    at `guest`: its files are read from the host's page cache, not copied into the guest's."""

    image: Path  # a clean raw ext4 with 4 KiB blocks, absolute
    guest: str  # absolute mount point in the guest


@dataclass(frozen=True)
class ProbeSpec:
    """One readiness condition (`ready:`): the first of log/tcp/http/command that is set."""

    kind: str  # log | tcp | http | command
    target: str  # the regexp, guest port, URL or shell command
    status: int = 200  # http: the expected status
    timeout: float = 60.0
    hint: str | None = None  # shown when it never becomes true
    source: str = ""  # file:line


@dataclass(frozen=True)
class ProvisionSpec:
    """A script run once after the first boot (`provision:`), as root or another user."""

    script: str
    user: str = "root"


@dataclass(frozen=True)
class SshSpec:
    user: str = "root"
    authorized_key: str | None = None  # public key text or a path; generated per machine when absent


@dataclass(frozen=True)
class LibvirtSpec:
    """Settings only the `libvirt` backend reads (docs/libvirt.md)."""

    uri: str = "qemu:///system"  # qemu+ssh://user@host/system runs the machine on another host
    domain_type: str = "kvm"  # kvm, or qemu (TCG: no /dev/kvm needed)
    network: str | None = None  # a libvirt network for the NIC (nat default: `default`)
    bridge: str | None = None  # a host bridge for the NIC instead of a libvirt network
    vsock: int | None = None  # guest CID (>= 3); 0: libvirt picks one; None: no vsock device
    upload: bool = False  # copy base images missing on a remote host there


@dataclass(frozen=True)
class MachineSpec:
    name: str
    backend: str = "kvm"
    cpus: int = 1
    memory: int = 256 << 20
    image: str = "busybox"  # reference image profile: busybox (initramfs) or debian (root disk)
    kernel: Path | None = None  # None: the reference kernel from `vmctl image build`
    initrd: Path | None = None
    cmdline: str | None = None
    disks: tuple[DiskSpec, ...] = ()
    mounts: tuple[MountSpec, ...] = ()
    pmem: tuple[PmemSpec, ...] = ()  # kvm: read-only bases mapped into the guest (virtio-pmem, DAX)
    network: NetworkSpec = field(default_factory=NetworkSpec)
    ssh: SshSpec = field(default_factory=SshSpec)
    environment: dict[str, str] = field(default_factory=dict)
    command: tuple[str, ...] = ()
    ready: tuple[ProbeSpec, ...] = ()
    provision: tuple[ProvisionSpec, ...] = ()
    ephemeral: bool = False
    memory_merge: bool = False  # kvm: guest RAM MADV_MERGEABLE, for the host's KSM to merge
    snapshot: str | None = None  # kvm: start as a clone of this snapshot (docs/snapshots.md), not from the spec's images
    libvirt: LibvirtSpec = field(default_factory=LibvirtSpec)
    source: str = ""  # "file:line" where the machine was declared, for messages


@dataclass(frozen=True)
class SpecFile:
    path: Path | None
    machines: tuple[MachineSpec, ...]

    def machine(self, name: str) -> MachineSpec:
        for machine in self.machines:
            if machine.name == name:
                return machine
        known = ", ".join(m.name for m in self.machines) or "none"
        from ..errors import VmctlError

        raise VmctlError(f"{self.path or '<spec>'}: no machine named {name!r} (machines: {known})")
