"""What this host's /dev/kvm can do, and whether Linux guests can boot on it."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from .errors import VmctlError
from .kvm import abi
from .kvm.system import KVM_DEVICE, Kvm, KvmFlavour
from .virtio import vhost

# Capabilities the native VMM uses, with why.
REQUIRED_CAPABILITIES = {
    "IRQCHIP": (abi.KVM_CAP_IRQCHIP, "in-kernel PIC/IOAPIC/LAPIC"),
    "PIT2": (abi.KVM_CAP_PIT2, "in-kernel timer"),
    "IRQFD": (abi.KVM_CAP_IRQFD, "device interrupts without an exit"),
    "IOEVENTFD": (abi.KVM_CAP_IOEVENTFD, "virtqueue kicks without an exit"),
    "USER_MEMORY": (abi.KVM_CAP_USER_MEMORY, "guest RAM from our mappings"),
    "SET_TSS_ADDR": (abi.KVM_CAP_SET_TSS_ADDR, "TSS placement"),
    "EXT_CPUID": (abi.KVM_CAP_EXT_CPUID, "KVM_GET_SUPPORTED_CPUID"),
    "MP_STATE": (abi.KVM_CAP_MP_STATE, "vCPU start states"),
    "IMMEDIATE_EXIT": (abi.KVM_CAP_IMMEDIATE_EXIT, "stopping vCPUs promptly"),
}


@dataclass
class HostReport:
    device: str
    usable: bool
    problem: str | None = None
    api_version: int | None = None
    kvm_module: str = "unknown"
    hardware_backed: bool = False
    capabilities: dict[str, bool] = field(default_factory=dict)
    max_vcpus: int | None = None
    recommended_vcpus: int | None = None
    cpuid_leaves: int | None = None
    vhost_net: bool = False  # virtio-net's data path can run in the kernel

    @property
    def boots_linux(self) -> bool:
        return self.usable and self.hardware_backed and all(self.capabilities.values())

    def as_dict(self) -> dict:
        return asdict(self) | {"boots_linux": self.boots_linux}


def check_host(device: str = KVM_DEVICE) -> HostReport:
    flavour = KvmFlavour.detect()
    report = HostReport(device=device, usable=False, kvm_module=flavour.module, hardware_backed=flavour.hardware_backed,
                        vhost_net=vhost.available())
    if not os.path.exists(device):
        report.problem = f"{device} does not exist"
        return report
    try:
        kvm = Kvm(device)
    except VmctlError as error:
        report.problem = str(error)
        return report
    with kvm:
        report.api_version = abi.KVM_API_VERSION
        report.capabilities = {name: kvm.check_extension(cap) > 0 for name, (cap, _) in REQUIRED_CAPABILITIES.items()}
        report.max_vcpus = kvm.check_extension(abi.KVM_CAP_MAX_VCPUS)
        report.recommended_vcpus = kvm.check_extension(abi.KVM_CAP_NR_VCPUS)
        report.cpuid_leaves = len(kvm.supported_cpuid())
    report.usable = all(report.capabilities.values())
    if not report.usable:
        missing = [name for name, ok in report.capabilities.items() if not ok]
        report.problem = "missing KVM capabilities: " + ", ".join(missing)
    return report


def describe(report: HostReport) -> list[str]:
    lines = [f"{'device':18} {report.device}"]
    if report.problem:
        lines.append(f"{'problem':18} {report.problem}")
    if report.api_version is not None:
        lines.append(f"{'api version':18} {report.api_version}")
    kind = {
        "kvm_pvm": "paravirtual (kvm_pvm): guest kernel code is emulated; stock Linux does not boot here",
        "kvm_intel": "hardware (Intel VT-x)",
        "kvm_amd": "hardware (AMD-V)",
    }.get(report.kvm_module, "unknown (no kvm_intel, kvm_amd or kvm_pvm module found)")
    lines.append(f"{'kvm implementation':18} {kind}")
    for name, ok in report.capabilities.items():
        lines.append(f"{'capability':18} {name:15} {'yes' if ok else 'MISSING'}  ({REQUIRED_CAPABILITIES[name][1]})")
    if report.max_vcpus is not None:
        lines.append(f"{'vcpus':18} max {report.max_vcpus}, recommended {report.recommended_vcpus}")
        lines.append(f"{'cpuid leaves':18} {report.cpuid_leaves}")
    lines.append(f"{'vhost-net':18} " + ("yes (virtio-net packets stay in the kernel)" if report.vhost_net else
                                         f"no: virtio-net is served in Python (load vhost_net for {vhost.DEVICE})"))
    from .vmm.sandbox import allowed, available
    why_not = available()
    state = "on" if os.environ.get("VMCTL_SANDBOX") == "1" else "off (VMCTL_SANDBOX=1 turns it on)"
    lines.append(f"{'vmm sandbox':18} " + (f"available, {state}: seccomp allow-list of {len(allowed())} "
                                           "system calls, no_new_privs, user nobody; networked machines "
                                           "too (their NAT rule goes at exit through a guard process)"
                                           if why_not is None else f"unavailable: {why_not}"))
    verdict = (
        "yes" if report.boots_linux
        else "tiny guests only (use the nested host for Linux: docs/nested-host.md)" if report.usable
        else "no"
    )
    lines.append(f"{'boots linux':18} {verdict}")
    return lines


# A paravirtual KVM (kvm_pvm) emulates guest kernel code and stops a stock Linux kernel with
# "KVM internal error ... emulation failure" after minutes (/work/shared/HOST-KVM.md). Saying so
# before anything starts is the only useful answer; this variable lets one try anyway.
TRY_ANYWAY_ENV = "VMCTL_TRY_LINUX_ON_PARAVIRT_KVM"
NESTED_HINT = ("run Linux guests in the nested host instead: `vmctl run --nested …`, or "
               "`python -m vmctl.nested -- vmctl …` for any command (docs/nested-host.md)")


def is_linux_kernel(path: str | os.PathLike) -> bool:
    """A bzImage (its 'HdrS' setup header), or an ELF that says "Linux version" (a vmlinux;
    the tiny test guests are ELF files without it)."""
    import mmap

    try:
        with open(path, "rb") as handle:
            head = handle.read(0x206)
            if head[0x202:0x206] == b"HdrS":
                return True
            if not head.startswith(b"\x7fELF"):
                return False
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return data.find(b"Linux version ") >= 0
    except (OSError, ValueError):
        return False


def linux_guest_problem(kernel: str | os.PathLike | None) -> str | None:
    """Why a Linux guest (the reference kernel when `kernel` is None) cannot boot on this
    host's /dev/kvm, with the next step; None when it can (or might: only kvm_pvm is known)."""
    if os.environ.get(TRY_ANYWAY_ENV) or os.environ.get("VMCTL_NESTED"):
        return None
    flavour = KvmFlavour.detect()
    if flavour.module != "kvm_pvm" or (kernel is not None and not is_linux_kernel(kernel)):
        return None
    return (f"this host's /dev/kvm is paravirtual ({flavour.module}): it emulates guest kernel code and a "
            f"Linux guest stops with a KVM emulation failure (`vmctl host-check`); {NESTED_HINT}")
