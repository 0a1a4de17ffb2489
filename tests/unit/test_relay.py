"""The relay's answer to a nested host that fails part-way: keep what finished, retry the
rest once in a fresh host. The host here is a stand-in that writes reports the way the
inner pytest does (the real one is exercised by the linux tier)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmctl.nested.l1_host import NestedHost, NestedResult, NestedStall
from vmctl.nested.relay import REPORTS_ENV, run_relayed

pytestmark = pytest.mark.unit


def _report(nodeid: str, when: str, outcome: str = "passed") -> dict:
    return {"$report_type": "TestReport", "nodeid": nodeid, "when": when, "outcome": outcome, "sections": []}


@dataclass
class ScriptedHost(NestedHost):
    """Each run() plays the next script: finish these tests, then stall on the next one."""

    scripts: list[tuple[int, bool]] = field(default_factory=list)  # (tests finished, stall after)
    selections: list[list[str]] = field(default_factory=list)

    def run(self, command, cwd=None, env=None, timeout=600.0, stall=None) -> NestedResult:
        nodeids = [arg for arg in command if "::" in arg]
        self.selections.append(nodeids)
        finished, stalls = self.scripts.pop(0)
        with Path(env[REPORTS_ENV]).open("a") as out:
            for nodeid in nodeids[:finished]:
                for when in ("setup", "call", "teardown"):
                    out.write(json.dumps(_report(nodeid, when)) + "\n")
            if stalls and finished < len(nodeids):
                out.write(json.dumps(_report(nodeids[finished], "setup")) + "\n")
                out.write('{"truncated')  # killed mid-write
                raise NestedStall("nested host made no progress for 720 s", "console tail")
        return NestedResult(0, "", "", "", 1.0, 1.0, 2.0)


TESTS = [f"tests/linux/inner/test_x.py::test_{n}" for n in range(5)]


def _outcomes(reports: list[dict]) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for report in reports:
        seen.setdefault(report["nodeid"], []).append(report["when"])
    return seen


def test_unfinished_tests_run_again_in_a_fresh_host(tmp_path):
    host = ScriptedHost(progress=lambda message: None, scripts=[(2, True), (3, False)])
    run = run_relayed(TESTS, tmp_path, host, timeout=600)
    assert host.selections == [TESTS, TESTS[2:]]  # the stalled test is among the retried
    assert run.error is None
    assert _outcomes(run.reports) == {n: ["setup", "call", "teardown"] for n in TESTS}
    retried = [r for r in run.reports if r["nodeid"] in TESTS[2:]]
    assert all("second nested host" in r["sections"][-1][1] for r in retried)
    assert all(r["sections"] == [] for r in run.reports if r["nodeid"] in TESTS[:2])


def test_a_second_failure_leaves_the_rest_without_reports_and_says_why(tmp_path):
    host = ScriptedHost(progress=lambda message: None, scripts=[(1, True), (1, True)])
    run = run_relayed(TESTS, tmp_path, host, timeout=600)
    assert len(host.selections) == 2
    assert set(_outcomes(run.reports)) == set(TESTS[:2])
    assert run.error.startswith("attempt 1: nested host made no progress") and "attempt 2:" in run.error


def test_a_healthy_host_runs_once(tmp_path):
    host = ScriptedHost(progress=lambda message: None, scripts=[(5, False)])
    run = run_relayed(TESTS, tmp_path, host, timeout=600)
    assert len(host.selections) == 1 and run.error is None and len(run.reports) == 15


def test_inner_test_that_hangs_fails_at_its_deadline_and_the_next_one_runs(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "test_hang.py").write_text(
        "import time\n"
        "def test_hangs():\n    time.sleep(60)\n"
        "def test_after():\n    pass\n"
    )
    reports = tmp_path / "reports.jsonl"
    env = {**os.environ, REPORTS_ENV: str(reports), "VMCTL_RELAY_TEST_TIMEOUT": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "vmctl.nested.relay", "-p", "no:cacheprovider", "-q",
         "--rootdir", str(tmp_path), str(tmp_path / "test_hang.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50,
    )
    calls = {r["nodeid"].split("::")[1]: r for r in map(json.loads, reports.read_text().splitlines())
             if r["when"] == "call"}
    assert calls["test_hangs"]["outcome"] == "failed", done.stdout
    assert "test still running after 1 s" in json.dumps(calls["test_hangs"]["longrepr"])
    assert calls["test_after"]["outcome"] == "passed"
