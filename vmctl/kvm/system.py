"""/dev/kvm itself: API version, capabilities, supported CPUID, creating VMs."""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

from ..errors import VmctlError
from . import abi
from .ioctl import ioctl

KVM_DEVICE = "/dev/kvm"


class Kvm:
    """An open /dev/kvm; close() or use as a context manager."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VmctlError(
                f"{path} does not exist: load the kvm module (modprobe kvm_intel or kvm_amd) "
                "or enable virtualization for this machine"
            ) from None
        except PermissionError:
            raise VmctlError(
                f"{path}: permission denied: run as root or add yourself to the 'kvm' group"
            ) from None
        version = ioctl(self.fd, abi.KVM_GET_API_VERSION)
        if version != abi.KVM_API_VERSION:
            os.close(self.fd)
            raise VmctlError(f"{path}: KVM API version {version}, vmctl needs {abi.KVM_API_VERSION}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_extension(self, capability: int) -> int:
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, capability)

    def vcpu_mmap_size(self) -> int:
        return ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[abi.KvmCpuidEntry2]:
        """The CPUID leaves this host's KVM can expose."""
        return cpuid_table(self.fd, abi.KVM_GET_SUPPORTED_CPUID)

    def msr_index_list(self) -> list[int]:
        """The MSRs KVM saves and restores for a vCPU (KVM_GET_MSR_INDEX_LIST)."""
        count = 256
        while True:
            table = abi.kvm_msr_list(count)(nmsrs=count)
            try:
                ioctl(self.fd, abi.KVM_GET_MSR_INDEX_LIST, table)
            except OSError as error:
                if error.errno == errno.E2BIG and count < 65536:
                    count = max(table.nmsrs, count * 2)
                    continue
                raise
            return [table.indices[i] for i in range(table.nmsrs)]

    def create_vm_fd(self) -> int:
        return ioctl(self.fd, abi.KVM_CREATE_VM, 0)


def copy_entry(entry: abi.KvmCpuidEntry2) -> abi.KvmCpuidEntry2:
    copy = abi.KvmCpuidEntry2()
    ctypes.memmove(ctypes.addressof(copy), ctypes.addressof(entry), ctypes.sizeof(entry))
    return copy


def cpuid_table(fd: int, request: int) -> list[abi.KvmCpuidEntry2]:
    """A CPUID table from KVM (supported, or a vCPU's own); grows the buffer until it fits."""
    count = 64
    while True:
        table = abi.kvm_cpuid2(count)(nent=count)
        try:
            ioctl(fd, request, table)
        except OSError as error:
            if error.errno == errno.E2BIG and count < 4096:
                count *= 2
                continue
            raise
        return [copy_entry(table.entries[i]) for i in range(table.nent)]


@dataclass(frozen=True)
class KvmFlavour:
    """Which KVM implementation backs /dev/kvm: decides whether Linux guests can boot here."""

    module: str  # kvm_intel, kvm_amd, kvm_pvm, or "unknown"
    hardware_backed: bool

    @classmethod
    def detect(cls, sys_module: str = "/sys/module") -> "KvmFlavour":
        for module, hardware in (("kvm_pvm", False), ("kvm_intel", True), ("kvm_amd", True)):
            if os.path.isdir(os.path.join(sys_module, module)):
                return cls(module, hardware)
        return cls("unknown", False)
