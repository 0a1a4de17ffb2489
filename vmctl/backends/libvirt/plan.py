"""Decisions that turn a MachineSpec into the parts of a DomainPlan: boot, NIC, names."""

from __future__ import annotations

import hashlib

from ...errors import VmctlError
from ...guest_contract import (
    AGENT_CMDLINE,
    AGENT_PORT_WORD,
    DEFAULT_CMDLINE,
    ROOT_CMDLINE,
    InitArgs,
    boot_script,
    reference_images,
)
from ...spec.model import MachineSpec
from .domain_xml import DiskPlan, DomainPlan, FilesystemPlan, NicPlan

DOMAIN_PREFIX = "vmctl-"
DEFAULT_NETWORK = "default"  # libvirt's own NAT network
# The guest device of the domain's one virtio console (domain_xml: the exec agent's port).
AGENT_CONSOLE_DEVICE = "hvc0"


def domain_name(machine: str) -> str:
    return DOMAIN_PREFIX + machine


def default_mac(machine: str) -> str:
    """Stable per machine name, in QEMU's 52:54:00 range, so a redefined machine keeps its lease."""
    digest = hashlib.sha256(machine.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def uses_vmctl_tap(spec: MachineSpec, remote: bool) -> bool:
    """A local machine with a network and no libvirt network or bridge of its own gets vmctl's
    TAP with a /30, as native VMs and containers do (so vmctl knows its address for SSH)."""
    return not remote and spec.network.mode != "none" and not spec.libvirt.bridge and not spec.libvirt.network


def check_network(spec: MachineSpec, vmctl_tap: bool) -> None:
    """The network section's mistakes, reported before anything is made."""
    if spec.network.mode == "none":
        return
    if spec.network.forwards and not vmctl_tap:
        raise VmctlError(f"{spec.name}: port forwards need vmctl's own network on a local libvirt "
                         f"(no libvirt.network or libvirt.bridge)")
    if spec.network.mode == "isolated" and not (vmctl_tap or spec.libvirt.bridge or spec.libvirt.network):
        raise VmctlError(f"{spec.name}: network mode isolated needs libvirt.network (an isolated "
                         f"libvirt network) or libvirt.bridge with backend libvirt")


def nic_for(spec: MachineSpec, tap: str | None = None) -> NicPlan | None:
    """The guest's NIC: on the spec's libvirt bridge or network, else on vmctl's `tap`, else
    on libvirt's default network (mode nat)."""
    check_network(spec, vmctl_tap=tap is not None)
    network, settings = spec.network, spec.libvirt
    if network.mode == "none":
        return None
    mac = network.mac or default_mac(spec.name)
    if settings.bridge:
        return NicPlan("bridge", settings.bridge, mac)
    if settings.network:
        return NicPlan("network", settings.network, mac)
    if tap is not None:
        return NicPlan("ethernet", tap, mac)
    return NicPlan("network", DEFAULT_NETWORK, mac)


def is_oci_boot(spec: MachineSpec) -> bool:
    return spec.kernel is None and spec.image.startswith("oci:")


def root_image(spec: MachineSpec) -> str | None:
    """The base of the root disk: the reference root filesystem of an image profile that
    boots from a disk (debian) when no kernel is given; None otherwise."""
    if spec.kernel is not None:
        return None
    if is_oci_boot(spec):
        return None  # its disks are the image's layers (disks.oci_disks)
    if spec.image == "busybox":
        return None  # an initramfs, no root disk (and a machine booting its own disk needs no kernel)
    try:
        root = reference_images(spec.image).root_disk
    except VmctlError as error:
        raise VmctlError(f"{spec.name}: {error}") from None
    return str(root) if root else None


def agent_words(agent_console: bool) -> tuple[str, ...]:
    """The agent's cmdline words: COM2 always (the fallback), and the virtio console's device
    when the domain has one (the guest agent takes it when the device node exists)."""
    return (AGENT_CMDLINE, *([f"{AGENT_PORT_WORD}={AGENT_CONSOLE_DEVICE}"] if agent_console else []))


def boot_for(spec: MachineSpec, default_cmdline: str = DEFAULT_CMDLINE, extra_words: tuple[str, ...] = (),
             agent_console: bool = False) -> tuple[str | None, str | None, str | None]:
    """(kernel, initrd, cmdline); no kernel and some disk (busybox profile): the firmware
    boots the first disk. `extra_words`: the network's `ip=` and `vmctl.sshkey=`;
    `agent_console`: the domain has the agent's virtio console."""
    if is_oci_boot(spec):
        return _oci_boot(spec, default_cmdline, extra_words, agent_console)
    kernel, initrd = spec.kernel, spec.initrd
    if kernel is None and spec.disks and spec.image == "busybox":
        if initrd is not None or spec.cmdline is not None:
            raise VmctlError(f"{spec.name}: initrd/cmdline need a kernel (the machine boots from its first disk)")
        if spec.command:
            raise VmctlError(f"{spec.name}: `command` needs direct kernel boot (give `kernel`)")
        if spec.mounts:
            raise VmctlError(f"{spec.name}: `mounts` need direct kernel boot (vmctl's /init mounts them; give `kernel`)")
        return None, None, None
    root = None
    if kernel is None:
        try:
            images = reference_images(spec.image)
        except VmctlError as error:
            raise VmctlError(f"{spec.name}: {error}") from None
        kernel, root = images.kernel, images.root_disk
        initrd = initrd or images.initrd
    # The native backend's contract with vmctl's /init: the exec agent on hvc0 or COM2 (unix
    # sockets in the domain XML), then the command with its environment, or a login shell.
    script = boot_script(spec.command, spec.environment, spec.ssh.user)
    words = InitArgs(hostname=spec.name, cmd=script,
                     mounts=[("9p", m.tag, m.guest, m.read_only) for m in spec.mounts]).words()
    cmdline = " ".join([spec.cmdline or default_cmdline, *agent_words(agent_console), *([ROOT_CMDLINE] if root else []),
                        *extra_words, *words])
    return str(kernel), str(initrd) if initrd else None, cmdline


def _oci_boot(spec: MachineSpec, default_cmdline: str, extra_words: tuple[str, ...],
              agent_console: bool) -> tuple[str, str, str]:
    """An OCI image: vmctl's kernel, the first-stage initramfs, `vmctl.layers=N` (docs/images.md)."""
    from ..kvm_prepare import oci_parts

    try:
        kernel = reference_images("busybox").kernel
    except VmctlError as error:
        raise VmctlError(f"{spec.name}: {error}") from None
    _, _, initrd, words, script = oci_parts(spec, None)
    cmdline = " ".join([spec.cmdline or default_cmdline, *agent_words(agent_console), *words, *extra_words,
                        *InitArgs(hostname=spec.name, cmd=script).words()])
    return str(kernel), str(initrd), cmdline


def domain_plan(spec: MachineSpec, *, uuid: str, domain_type: str, disks: tuple[DiskPlan, ...],
                console_log: str, agent_socket: str | None, run_as: tuple[int, int] | None,
                state_folder: str, tap: str | None = None, extra_words: tuple[str, ...] = (),
                agent_console: str | None = None) -> DomainPlan:
    """Everything the domain XML says, decided; only the disks, TAP and paths come from outside.
    `agent_socket`/`agent_console`: the unix sockets of the agent's COM2 and virtio console."""
    if spec.pmem:
        raise VmctlError(f"{spec.source or spec.name}: pmem: not supported with backend: libvirt yet (kvm only)")
    kernel, initrd, cmdline = boot_for(spec, DEFAULT_CMDLINE, extra_words, agent_console is not None)
    return DomainPlan(
        machine=spec.name, name=domain_name(spec.name), uuid=uuid, domain_type=domain_type,
        cpus=spec.cpus, memory=spec.memory, console_log=console_log, kernel=kernel, initrd=initrd,
        cmdline=cmdline, disks=disks, nic=nic_for(spec, tap), agent_socket=agent_socket, agent_console=agent_console,
        filesystems=tuple(FilesystemPlan(str(m.host), m.tag, m.read_only) for m in spec.mounts),
        vsock_cid=spec.libvirt.vsock, run_as=run_as, state_folder=state_folder,
    )
