"""Run many pytest tests inside ONE nested host boot and hand their reports back.

Inside L1, this module is a pytest plugin (`-p vmctl.nested.relay`): with
$VMCTL_RELAY_REPORTS set it appends every test and failed-collection report, serialized
by pytest's own `pytest_report_to_serializable` hook (what pytest-xdist uses too), as one
JSON line to that file, which lives in a directory shared writable with the host.
Outside, run_relayed() boots the nested host once for the whole selection; the outer
session turns the lines back into reports (`pytest_report_from_serializable`) so each
test shows up with its real outcome, output and traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from . import scratch
from .host import NestedHost, NestedHostError

REPORTS_ENV = "VMCTL_RELAY_REPORTS"


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


def pytest_configure(config: Any) -> None:
    path = os.environ.get(REPORTS_ENV)
    if path:
        config.pluginmanager.register(_Recorder(config, Path(path)), "vmctl-relay-recorder")


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
    """Run `nodeids` (relative to `rootdir`) with pytest inside one nested host."""
    exchange = scratch.make("vmctl-relay-")
    try:
        reports_file = exchange / "reports.jsonl"
        command = [
            sys.executable, "-m", "pytest", "-p", "vmctl.nested.relay", "-p", "no:cacheprovider",
            "-q", "--rootdir", str(rootdir), *nodeids,
        ]
        host = replace(nested, shares=[*nested.shares, exchange])
        try:
            result = host.run(command, cwd=rootdir, env={REPORTS_ENV: str(reports_file)}, timeout=timeout)
        except NestedHostError as error:
            return RelayRun([], None, "", f"{error}\n{error.console_tail}")
        lines = reports_file.read_text().splitlines() if reports_file.exists() else []
        reports = [json.loads(line) for line in lines]
        return RelayRun(reports, result.exit_code, result.stdout + result.stderr, None)
    finally:
        shutil.rmtree(exchange, ignore_errors=True)
