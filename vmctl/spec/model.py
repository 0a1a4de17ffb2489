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
    network: NetworkSpec = field(default_factory=NetworkSpec)
    ssh: SshSpec = field(default_factory=SshSpec)
    environment: dict[str, str] = field(default_factory=dict)
    command: tuple[str, ...] = ()
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
