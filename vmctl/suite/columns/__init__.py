"""One module per column: how an instance of the bench image is started, reached and removed.

native     chroot into an overlay of the image tree on the host (no namespaces but mount, no cgroup)
container  vmctl's container backend (OCI runtime, overlayfs on the same tree)
docker     a real Docker Engine; the suite starts its own dockerd when none runs
vm         vmctl's own VMM (the kvm backend), booting the image's qcow2 through an overlay
qemu       the libvirt backend: QEMU/KVM, the VM a user would otherwise pick
"""

from __future__ import annotations

from .base import COLUMN_NAMES, ColumnUnavailable, Instance, InstanceSpec, Runner, open_column

__all__ = ["COLUMN_NAMES", "ColumnUnavailable", "Instance", "InstanceSpec", "Runner", "open_column"]
