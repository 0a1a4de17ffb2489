"""Decisions that turn a MachineSpec into the parts of a DomainPlan: boot, NIC, names."""

from __future__ import annotations

import hashlib

from ...errors import VmctlError
from ...spec.model import MachineSpec
from ...images.initargs import InitArgs
from ..kvm import default_images
from ..kvm_prepare import AGENT_CMDLINE, guest_script
from ...vmm.machine import DEFAULT_CMDLINE
from .domain_xml import DiskPlan, DomainPlan, NicPlan

DOMAIN_PREFIX = "vmctl-"
DEFAULT_NETWORK = "default"  # libvirt's own NAT network


def domain_name(machine: str) -> str:
    return DOMAIN_PREFIX + machine


def default_mac(machine: str) -> str:
    """Stable per machine name, in QEMU's 52:54:00 range, so a redefined machine keeps its lease."""
    digest = hashlib.sha256(machine.encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def nic_for(spec: MachineSpec) -> NicPlan | None:
    network, settings = spec.network, spec.libvirt
    if network.mode == "none":
        return None
    if network.forwards:
        raise VmctlError(f"{spec.name}: port forwards are not supported by the libvirt backend "
                         f"(use a libvirt network with routes, or backend kvm)")
    mac = network.mac or default_mac(spec.name)
    if settings.bridge:
        return NicPlan("bridge", settings.bridge, mac)
    if settings.network:
        return NicPlan("network", settings.network, mac)
    if network.mode == "isolated":
        raise VmctlError(f"{spec.name}: network mode isolated needs libvirt.network (an isolated "
                         f"libvirt network) or libvirt.bridge with backend libvirt")
    return NicPlan("network", DEFAULT_NETWORK, mac)


def boot_for(spec: MachineSpec, default_cmdline: str = DEFAULT_CMDLINE) -> tuple[str | None, str | None, str | None]:
    """(kernel, initrd, cmdline); no kernel and some disk: the firmware boots the first disk."""
    kernel, initrd = spec.kernel, spec.initrd
    if kernel is None and spec.disks:
        if initrd is not None or spec.cmdline is not None:
            raise VmctlError(f"{spec.name}: initrd/cmdline need a kernel (the machine boots from its first disk)")
        if spec.command:
            raise VmctlError(f"{spec.name}: `command` needs direct kernel boot (give `kernel`)")
        return None, None, None
    if kernel is None:
        try:
            reference_kernel, reference_initrd = default_images()
        except VmctlError as error:
            raise VmctlError(f"{spec.name}: {error}") from None
        kernel, initrd = reference_kernel, initrd or reference_initrd
    # The native backend's contract with vmctl's /init: the exec agent on COM2 (a unix socket
    # in the domain XML), then the command with its environment, or a login shell.
    script = guest_script(spec.command, spec.environment, "root")
    words = InitArgs(hostname=spec.name, cmd=script).words()
    cmdline = " ".join([spec.cmdline or default_cmdline, AGENT_CMDLINE, *words])
    return str(kernel), str(initrd) if initrd else None, cmdline


def domain_plan(spec: MachineSpec, *, uuid: str, domain_type: str, disks: tuple[DiskPlan, ...],
                console_log: str, agent_socket: str | None, run_as: tuple[int, int] | None,
                state_folder: str) -> DomainPlan:
    """Everything the domain XML says, decided; only the disks and paths come from outside."""
    kernel, initrd, cmdline = boot_for(spec, DEFAULT_CMDLINE)
    return DomainPlan(
        machine=spec.name, name=domain_name(spec.name), uuid=uuid, domain_type=domain_type,
        cpus=spec.cpus, memory=spec.memory, console_log=console_log, kernel=kernel, initrd=initrd,
        cmdline=cmdline, disks=disks, nic=nic_for(spec), agent_socket=agent_socket,
        vsock_cid=spec.libvirt.vsock, run_as=run_as, state_folder=state_folder,
    )
