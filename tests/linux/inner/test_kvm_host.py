"""The host the inner tests run on: hardware-style KVM that vmctl accepts for Linux guests."""

from __future__ import annotations

import os

from vmctl.host_probe import check_host
from vmctl.kvm.system import KvmFlavour


def test_dev_kvm_is_hardware_backed() -> None:
    flavour = KvmFlavour.detect()
    assert flavour.hardware_backed, f"kvm module here: {flavour.module}"


def test_hostcheck_says_linux_boots_here() -> None:
    report = check_host()
    assert report.boots_linux, report.problem or report.capabilities


def test_nested_marker_matches_kvm_module() -> None:
    # Inside the nested host the CPU is emulated AMD-V: kvm_amd, and VMCTL_NESTED=1.
    if os.environ.get("VMCTL_NESTED") == "1":
        assert KvmFlavour.detect().module == "kvm_amd"
