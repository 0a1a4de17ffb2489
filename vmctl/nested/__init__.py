"""The nested KVM host: a test harness for machines whose own /dev/kvm cannot boot Linux.

It boots an L1 Linux under QEMU TCG with an emulated AMD-V CPU (so /dev/kvm inside is
kvm_amd), shows it this machine's filesystem, runs one command there and returns the
command's output and exit code. See docs/nested-host.md.
"""

from .detect import TierPlan, plan_linux_tier
from .l1_host import NestedHost, NestedHostError, NestedResult, NestedTimeout
from .runner import LinuxRunner, RunResult

__all__ = [
    "LinuxRunner",
    "NestedHost",
    "NestedHostError",
    "NestedResult",
    "NestedTimeout",
    "RunResult",
    "TierPlan",
    "plan_linux_tier",
]
