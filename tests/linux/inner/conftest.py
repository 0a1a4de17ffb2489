"""Inner linux-tier tests: they run on a Linux host whose /dev/kvm is hardware-backed.

That host is this one ("direct"), or, where this one's KVM cannot boot Linux, the nested
host: tests/linux/conftest.py then runs every selected test of this folder inside ONE L1
boot and reports each result here. Write them as plain tests that use /dev/kvm directly;
`VMCTL_NESTED=1` is set when they run inside L1. In "skip" mode they are skipped here.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmctl.images import locate
from vmctl.nested import TierPlan

LIBVIRT_URI = "qemu:///system"


@pytest.fixture(autouse=True)
def _linux_kvm_host(linux_tier: TierPlan) -> None:
    # Relayed tests never get here on the outer host; "nested" here would mean a
    # relay that did not happen, which must not pass silently.
    if linux_tier.mode != "direct":
        pytest.skip(linux_tier.reason)


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[str]:
    """The system libvirtd's URI for a module of libvirt guests. Inside the nested host none
    runs: it is started (with virtlogd) after adapting L1 (vmctl/backends/libvirt/daemons.py)
    and stopped after the module."""
    from vmctl.backends.libvirt.daemons import missing_reason, start_here

    if not locate("busybox").initramfs.exists():
        pytest.skip("the reference images are not built (vmctl image build)")
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    started = start_here(LIBVIRT_URI)
    yield LIBVIRT_URI
    started.stop()
