"""Test tiers: each test is marked by its folder (tests/unit, tests/kvm, tests/linux).

At the end of a run a table says, per tier, how many tests ran, passed, failed and were
skipped, and why they were skipped, so CI output shows which tiers really ran.

Every test has $VMCTL_TEST_TIMEOUT seconds (default 900): one that hangs fails with the
traceback of where it was and the run goes on, so CI always ends with a full report.
Relayed linux-tier tests keep the relay's own clocks (docs/nested-host.md).
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

TIERS = ("unit", "kvm", "linux")
_HERE = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    from vmctl.nested.relay import REPORTS_ENV, TestDeadline

    if os.environ.get(REPORTS_ENV):
        return  # inside the nested host: the relay plugin sets the deadline
    seconds = float(os.environ.get("VMCTL_TEST_TIMEOUT", "900"))
    config.pluginmanager.register(TestDeadline(seconds, "VMCTL_TEST_TIMEOUT", exempt=_relayed), "vmctl-test-deadline")


def _relayed(item: pytest.Item) -> bool:
    return item.get_closest_marker("relayed") is not None  # set by tests/linux/conftest.py


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            tier = Path(item.fspath).relative_to(_HERE).parts[0]
        except ValueError:
            continue
        if tier in TIERS and not item.get_closest_marker(tier):
            item.add_marker(getattr(pytest.mark, tier))


_outcomes: dict[str, collections.Counter] = {tier: collections.Counter() for tier in TIERS}
_skip_reasons: dict[str, collections.Counter] = {tier: collections.Counter() for tier in TIERS}


def _tier_of(item_keywords) -> str | None:
    for tier in TIERS:
        if tier in item_keywords:
            return tier
    return None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    tier = _tier_of(report.keywords)
    if tier is None:
        return
    if report.skipped:
        _outcomes[tier]["skipped"] += 1
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skip_reasons[tier][reason.removeprefix("Skipped: ")] += 1
    elif report.when == "call":
        _outcomes[tier]["passed" if report.passed else "failed"] += 1
    elif report.failed:
        _outcomes[tier]["failed"] += 1


def pytest_terminal_summary(terminalreporter) -> None:
    write = terminalreporter.write_line
    terminalreporter.section("vmctl test tiers")
    for tier in TIERS:
        counts = _outcomes[tier]
        ran = counts["passed"] + counts["failed"]
        state = "RAN" if ran else "DID NOT RUN"
        write(
            f"{tier:6} {state:12} passed={counts['passed']} failed={counts['failed']} "
            f"skipped={counts['skipped']}"
        )
        for reason, n in _skip_reasons[tier].most_common():
            write(f"       skipped {n}x: {reason}")


@dataclass(frozen=True)
class KernelFiles:
    vmlinux: Path
    bzimage: Path


@pytest.fixture(scope="session")
def reference_kernel() -> KernelFiles:
    """The reference guest kernel built by `vmctl image kernel` (or $VMCTL_TEST_KERNEL_DIR)."""
    folder = os.environ.get("VMCTL_TEST_KERNEL_DIR")
    if folder:
        files = KernelFiles(Path(folder) / "vmlinux", Path(folder) / "arch/x86/boot/bzImage")
        if not files.bzimage.exists():
            files = KernelFiles(Path(folder) / "vmlinux", Path(folder) / "bzImage")
    else:
        try:
            from vmctl.images import locate
        except ImportError:
            pytest.skip("vmctl.images is not available to locate the reference kernel")
        found = locate()
        files = KernelFiles(found.vmlinux, found.bzimage)
    if not (files.vmlinux.exists() and files.bzimage.exists()):
        pytest.skip(f"reference kernel not built ({files.vmlinux}): run `vmctl image kernel`")
    return files
