"""The linux tier: real Linux guests on hardware-backed KVM.

How each test runs is decided once per session (vmctl.nested.detect.plan_linux_tier):
- "direct": this host's /dev/kvm is hardware-backed; every test runs here, as usual.
- "nested": it is not (kvm_pvm here); tests under tests/linux/inner/ are *relayed*: at
  the first of them, ONE nested host boots and runs all the selected inner tests with
  pytest inside L1 (vmctl.nested.relay), and their reports are replayed here one by one,
  so each shows its own outcome, output and traceback.
- "skip": neither works; tests that need it are skipped with the precise reason.
Tests directly in tests/linux/ run in this session whatever the mode (the harness's own
tests, or tests that drive the nested host themselves through the `linux_runner` fixture).

Settings: $VMCTL_LINUX_TIER=direct|nested|skip forces a mode; $VMCTL_NESTED_MEMORY_MIB,
$VMCTL_NESTED_CPUS size L1; $VMCTL_LINUX_TIER_TIMEOUT bounds the relayed run (seconds).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _pytest.reports import TestReport

from vmctl.nested import LinuxRunner, NestedHost, TierPlan, plan_linux_tier
from vmctl.nested.relay import RelayRun, run_relayed, to_report

INNER = Path(__file__).parent / "inner"
_PLAN = pytest.StashKey[TierPlan]()
_RELAY = pytest.StashKey[RelayRun]()


def tier_plan(config: pytest.Config) -> TierPlan:
    if _PLAN not in config.stash:
        config.stash[_PLAN] = plan_linux_tier()
    return config.stash[_PLAN]


def nested_host(config: pytest.Config) -> NestedHost:
    """The L1 settings for this session; progress lines go straight to the terminal."""
    capture = config.pluginmanager.getplugin("capturemanager")
    terminal = config.pluginmanager.getplugin("terminalreporter")

    def progress(message: str) -> None:
        with capture.global_and_fixture_disabled():
            terminal.write_line(f"[nested] {message}")

    return NestedHost(
        # 6 GiB: the tier's guests, their tmpfs files and libvirtd all live in L1's RAM.
        memory_mib=int(os.environ.get("VMCTL_NESTED_MEMORY_MIB", "6144")),
        cpus=int(os.environ.get("VMCTL_NESTED_CPUS", "2")),
        progress=progress,
    )


@pytest.fixture(scope="session")
def linux_tier(pytestconfig: pytest.Config) -> TierPlan:
    """How this session runs Linux guests: .mode is "direct", "nested" or "skip"."""
    return tier_plan(pytestconfig)


@pytest.fixture(scope="session")
def linux_runner(pytestconfig: pytest.Config) -> LinuxRunner:
    """run(argv, cwd=, env=, timeout=) -> RunResult(exit_code, stdout, stderr) on a Linux
    host with hardware KVM: here, or in a fresh nested host per call (seconds each)."""
    plan = tier_plan(pytestconfig)
    if plan.mode == "skip":
        pytest.skip(plan.reason)
    return LinuxRunner(plan.mode, nested_host(pytestconfig))


def _relayed(item: pytest.Item) -> bool:
    return INNER in Path(item.path).parents and tier_plan(item.config).mode == "nested"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _relayed(item):
            item.add_marker(pytest.mark.relayed)  # keeps the relay's clocks (tests/conftest.py)


def _relay(session: pytest.Session) -> RelayRun:
    """The one nested run of every selected inner test (started by the first of them)."""
    if _RELAY not in session.stash:
        config = session.config
        nodeids = [item.nodeid for item in session.items if _relayed(item)]
        host = nested_host(config)
        host.progress(f"{len(nodeids)} linux-tier test(s) run inside one nested host ({tier_plan(config).reason})")
        timeout = float(os.environ.get("VMCTL_LINUX_TIER_TIMEOUT", "3600"))
        session.stash[_RELAY] = run_relayed(nodeids, config.rootpath, host, timeout)
    return session.stash[_RELAY]


def _reports(item: pytest.Item, relay: RelayRun) -> list[TestReport]:
    found = [
        to_report(item.config, data)
        for data in relay.reports
        if data.get("nodeid") == item.nodeid and data.get("$report_type") == "TestReport"
    ]
    if found:
        return found
    keywords = dict.fromkeys(item.keywords, 1)

    def report(when: str, outcome: str, longrepr: str | None = None) -> TestReport:
        return TestReport(item.nodeid, item.location, keywords, outcome, longrepr, when)

    return [report("setup", "passed"), report("call", "failed", relay.problem()), report("teardown", "passed")]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if not _relayed(item):
        return None
    relay = _relay(item.session)
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in _reports(item, relay):
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True
