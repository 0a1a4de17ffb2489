"""How real Linux guests can run here: directly, inside the nested host, or not at all.

"direct": this host's /dev/kvm is hardware-backed (kvm_intel/kvm_amd) with every
capability the VMM needs — also true inside the nested host itself, so nothing recurses.
"nested": it is not (e.g. kvm_pvm), but QEMU, static busybox, cpio and the L1 kernel are
to hand. "skip": neither, with the reasons.
$VMCTL_LINUX_TIER=direct|nested|skip forces a mode (nested on a hardware host tests the
harness; an impossible forced mode still turns into "skip" with the reason).
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass

from ..errors import VmctlError
from ..host_probe import check_host
from . import l1_kernel
from .initramfs import find_busybox
from .l1_qemu import QEMU

FORCE_ENV = "VMCTL_LINUX_TIER"
MODES = ("direct", "nested", "skip")


@dataclass(frozen=True)
class TierPlan:
    mode: str  # one of MODES
    reason: str  # why this mode; for "skip", the full skip reason


def direct_problem() -> str | None:
    """Why Linux guests cannot run on this host's /dev/kvm, or None when they can."""
    report = check_host()
    if report.boots_linux:
        return None
    if not report.usable:
        return report.problem or "/dev/kvm is not usable"
    if report.kvm_module == "kvm_pvm":
        return "/dev/kvm is paravirtual (kvm_pvm) and cannot boot a stock Linux kernel"
    return f"/dev/kvm is not hardware-backed (kvm module: {report.kvm_module})"


def nested_problem() -> str | None:
    """Why the nested host cannot run here, or None when it can (the kernel may still need fetching)."""
    if platform.machine() != "x86_64":
        return f"the nested host needs an x86_64 host (this is {platform.machine()})"
    if not shutil.which(QEMU):
        return f"{QEMU} not found (Debian: qemu-system-x86)"
    if not shutil.which("cpio"):
        return "cpio not found (Debian: cpio)"
    try:
        find_busybox()
    except VmctlError as error:
        return str(error)
    return l1_kernel.obtain_problem()


def plan_linux_tier() -> TierPlan:
    forced = os.environ.get(FORCE_ENV, "")
    if forced and forced not in MODES:
        return TierPlan("skip", f"${FORCE_ENV}={forced} is not one of {', '.join(MODES)}")
    if forced == "skip":
        return TierPlan("skip", f"${FORCE_ENV}=skip")
    direct = None if forced == "nested" else direct_problem()
    if forced != "nested" and direct is None:
        return TierPlan("direct", "/dev/kvm is hardware-backed")
    if forced == "direct":
        return TierPlan("skip", f"${FORCE_ENV}=direct but {direct}")
    nested = nested_problem()
    why_not_direct = direct or f"${FORCE_ENV}=nested"
    if nested is None:
        return TierPlan("nested", f"{why_not_direct}: Linux guests run inside the nested host")
    return TierPlan("skip", f"no KVM that boots Linux: {why_not_direct}; nested host unavailable: {nested}")
