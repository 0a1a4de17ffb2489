"""Run many pytest tests inside ONE nested host boot and hand their reports back.

Inside L1, this module is a pytest plugin (`-p vmctl.nested.relay`): with
$VMCTL_RELAY_REPORTS set it appends every test and failed-collection report, serialized
by pytest's own `pytest_report_to_serializable` hook (what pytest-xdist uses too), as one
JSON line to that file, which lives in a directory shared writable with the host.
Outside, run_relayed() boots the nested host once for the whole selection; the outer
session turns the lines back into reports (`pytest_report_from_serializable`) so each
test shows up with its real outcome, output and traceback.

Two clocks keep one hang from costing the whole selection: inside, a test that runs longer
than $VMCTL_RELAY_TEST_TIMEOUT fails with the traceback of where it was (SIGALRM); outside,
an L1 whose report file stops growing for longer than that is declared stalled and killed,
and the tests it had not finished run again, once, in a fresh L1 (an emulated L1 can wedge
on its own; that retry is reported in the outcome of every test it covers).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

from . import scratch
from .l1_host import NestedHost, NestedHostError, Stall

REPORTS_ENV = "VMCTL_RELAY_REPORTS"
TEST_TIMEOUT_ENV = "VMCTL_RELAY_TEST_TIMEOUT"
DEFAULT_TEST_TIMEOUT = 600.0  # the slowest inner test takes about a minute in the nested host
STALL_GRACE = 120.0  # beyond the per-test timeout: time to report the timeout itself
ATTEMPTS = 2


# --- inside L1 -------------------------------------------------------------------------


class _Recorder:
    def __init__(self, config: Any, path: Path) -> None:
        self.config = config
        self.path = path

    def _write(self, report: Any) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        with self.path.open("a") as out:
            out.write(json.dumps(data) + "\n")

    def pytest_runtest_logreport(self, report: Any) -> None:
        self._write(report)

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self._write(report)


class TestTimeout(Exception):
    """Raised in the main thread when one test runs past its deadline."""


class TestDeadline:
    """A pytest plugin: each test (setup, call, teardown) gets `seconds`, then SIGALRM fails
    it with the traceback of where it was stuck, and the session goes on. Tests for which
    `exempt(item)` is true keep their own clock."""

    def __init__(self, seconds: float, variable: str, exempt: Callable[[Any], bool] = lambda item: False) -> None:
        self.seconds = seconds
        self.variable = variable
        self.exempt = exempt

    def _expired(self, signum: int, frame: Any) -> None:
        raise TestTimeout(f"test still running after {self.seconds:g} s (${self.variable})")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: Any, nextitem: Any) -> Iterator[None]:
        if self.exempt(item):
            yield
            return
        previous = signal.signal(signal.SIGALRM, self._expired)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def per_test_timeout() -> float:
    return float(os.environ.get(TEST_TIMEOUT_ENV, DEFAULT_TEST_TIMEOUT))


def pytest_configure(config: Any) -> None:
    path = os.environ.get(REPORTS_ENV)
    if path:
        config.pluginmanager.register(_Recorder(config, Path(path)), "vmctl-relay-recorder")
        config.pluginmanager.register(TestDeadline(per_test_timeout(), TEST_TIMEOUT_ENV), "vmctl-relay-deadline")


# --- on the host -----------------------------------------------------------------------


@dataclass(frozen=True)
class RelayRun:
    reports: list[dict]  # serialized reports, in the order the inner run made them
    exit_code: int | None  # the inner pytest's; None when the nested host itself failed
    output: str  # the inner pytest's stdout then stderr
    error: str | None  # the nested host's failure, with its console tail

    def problem(self, lines: int = 60) -> str:
        """Why a test has no report: the host failure, or the tail of the inner output."""
        if self.error:
            return f"the nested host failed: {self.error}"
        tail = "\n".join(self.output.splitlines()[-lines:])
        return f"no result from the nested run (inner pytest exit code {self.exit_code}); its output ends:\n{tail}"


def to_report(config: Any, data: dict) -> Any:
    """A report back from its JSON form (JSON made the skip location tuple a list)."""
    report = config.hook.pytest_report_from_serializable(config=config, data=data)
    if isinstance(report.longrepr, list):
        report.longrepr = tuple(report.longrepr)
    return report


def run_relayed(nodeids: Sequence[str], rootdir: Path, nested: NestedHost, timeout: float) -> RelayRun:
    """Run `nodeids` (relative to `rootdir`) with pytest inside a nested host; when that
    host fails (stalls, crashes, times out), the unfinished tests get one fresh host more."""
    deadline = time.monotonic() + timeout
    reports: list[dict] = []
    remaining = list(nodeids)
    errors: list[str] = []
    run = RelayRun([], None, "", None)
    for attempt in range(1, ATTEMPTS + 1):
        left = deadline - time.monotonic()
        if not remaining or left <= 0:
            break
        if attempt > 1:
            nested.progress(f"nested host failed; running the {len(remaining)} unfinished test(s) in a fresh one")
        run = _run_once(remaining, rootdir, nested, left)
        finished = {r["nodeid"] for r in run.reports if r.get("when") == "teardown"}
        # A test cut short by the host's failure is run again; its partial reports are not kept.
        kept = [r for r in run.reports if r.get("nodeid") in finished or "when" not in r]
        if attempt > 1:
            kept = [{**r, "sections": [*r.get("sections", []), ["nested host", _retry_note(errors)]]} for r in kept]
        reports += kept
        remaining = [n for n in remaining if n not in finished]
        if run.error is None:
            break
        errors.append(run.error)
    error = "\n\n".join(f"attempt {i}: {e}" for i, e in enumerate(errors, 1)) if remaining and errors else None
    return RelayRun(reports, run.exit_code, run.output, error)


def _retry_note(errors: list[str]) -> str:
    first = errors[0].splitlines()[0] if errors else ""
    return f"ran in a second nested host after the first failed: {first}"


def _run_once(nodeids: Sequence[str], rootdir: Path, nested: NestedHost, timeout: float) -> RelayRun:
    """One nested host for `nodeids`: every report it wrote, even when it failed."""
    exchange = scratch.make("vmctl-relay-")
    try:
        reports_file = exchange / "reports.jsonl"
        command = [
            sys.executable, "-m", "pytest", "-p", "vmctl.nested.relay", "-p", "no:cacheprovider",
            "-q", "--rootdir", str(rootdir), *nodeids,
        ]
        host = replace(nested, shares=[*nested.shares, exchange])
        stall = Stall(reports_file, per_test_timeout() + STALL_GRACE)
        env = {REPORTS_ENV: str(reports_file), TEST_TIMEOUT_ENV: str(per_test_timeout())}
        error = None
        result = None
        try:
            result = host.run(command, cwd=rootdir, env=env, timeout=timeout, stall=stall)
        except NestedHostError as failure:
            error = f"{failure}\n{failure.console_tail}"
        lines = reports_file.read_text().splitlines() if reports_file.exists() else []
        reports = [json.loads(line) for line in lines[:-1]]
        if lines:
            try:  # the last line may be cut short when the host was killed mid-write
                reports.append(json.loads(lines[-1]))
            except json.JSONDecodeError:
                pass
        if result is None:
            return RelayRun(reports, None, "", error)
        return RelayRun(reports, result.exit_code, result.stdout + result.stderr, None)
    finally:
        shutil.rmtree(exchange, ignore_errors=True)
