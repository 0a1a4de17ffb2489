"""Backends run a machine spec: `kvm` (vmctl's own VMM); `libvirt` and `container` plug in here."""

from __future__ import annotations

from ..errors import VmctlError
from .base import Backend


def get_backend(name: str) -> Backend:
    if name == "kvm":
        from .kvm import KvmBackend

        return KvmBackend()
    if name == "libvirt":
        from .libvirt import LibvirtBackend

        return LibvirtBackend()
    if name == "container":
        from .container import ContainerBackend

        return ContainerBackend()
    raise VmctlError(f"backend {name!r} is not available (available: kvm, libvirt, container)")
