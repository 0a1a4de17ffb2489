"""Inner linux-tier tests: they run on a Linux host whose /dev/kvm is hardware-backed.

That host is this one ("direct"), or, where this one's KVM cannot boot Linux, the nested
host: tests/linux/conftest.py then runs every selected test of this folder inside ONE L1
boot and reports each result here. Write them as plain tests that use /dev/kvm directly;
`VMCTL_NESTED=1` is set when they run inside L1. In "skip" mode they are skipped here.
"""

from __future__ import annotations

import pytest

from vmctl.nested import TierPlan


@pytest.fixture(autouse=True)
def _linux_kvm_host(linux_tier: TierPlan) -> None:
    # Relayed tests never get here on the outer host; "nested" here would mean a
    # relay that did not happen, which must not pass silently.
    if linux_tier.mode != "direct":
        pytest.skip(linux_tier.reason)
