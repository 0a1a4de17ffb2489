"""Result model, ratio maths and report rendering of `vmctl compare --suite`."""

import json

import pytest

from vmctl.errors import VmctlError
from vmctl.suite import report
from vmctl.suite.model import NESTED, Column, Series, Stats, SuiteRun
from vmctl.suite.ratios import comparable, ratio
from vmctl.suite.runner import parse_columns, parse_instances, parse_suites

pytestmark = pytest.mark.unit


def make_run() -> SuiteRun:
    run = SuiteRun(["startup", "cpu", "density"], False, {"cpu_model": "Test CPU", "kvm_mode": "hardware"})
    run.columns = [Column("native"), Column("container"), Column("docker", status="not run", why="docker: no dockerd"),
                   Column("native", NESTED), Column("vm", NESTED, "VM")]
    for value in (100.0, 110.0, 90.0):
        run.add("cpu_events_per_s", "native", value)
        run.add("cpu_events_per_s", "container", value * 0.5)
    run.add("cpu_events_per_s", "native@L1", 10.0)
    run.add("cpu_events_per_s", "vm@L1", 8.0)
    run.add("ready_s", "native", 0.0)
    run.add("ready_s", "container", 0.8)
    run.series.append(Series("density", "container", "pss_mib", [1, 2, 4], [15.0, 30.0, 60.0]))
    return run


def test_stats():
    assert Stats.of([3.0, 1.0, 2.0]) == Stats(3, 1.0, 2.0, 3.0)
    with pytest.raises(ValueError):
        Stats.of([])


def test_ratio_is_taken_against_native_of_the_same_place():
    run = make_run()
    assert ratio(run, "cpu_events_per_s", "container") == pytest.approx(0.5)
    assert ratio(run, "cpu_events_per_s", "vm@L1") == pytest.approx(0.8)  # 8 / L1's native 10, not the host's 100
    assert ratio(run, "cpu_events_per_s", "native") is None
    assert ratio(run, "ready_s", "container") is None  # native 0: no ratio, not infinity
    assert ratio(run, "cpu_events_per_s", "docker") is None  # not run
    assert comparable(run, "native", "container") and not comparable(run, "container", "vm@L1")


def test_json_round_trip_keeps_every_sample_and_stats():
    run = make_run()
    data = json.loads(report.to_json(run))
    assert data["schema"] == "vmctl-compare-suite/1"
    native = next(m for m in data["measurements"] if m["row"] == "cpu_events_per_s" and m["column"] == "native")
    assert native["samples"] == [100.0, 110.0, 90.0]
    assert native["stats"] == {"n": 3, "min": 90.0, "median": 100.0, "max": 110.0}
    again = SuiteRun.from_dict(data)
    assert again.as_dict() == run.as_dict()


def test_markdown_table_has_ratios_felter_and_places():
    text = report.markdown(make_run())
    header = text.splitlines()[0]
    assert "| native | container | docker | native (L1) | vm (L1) | Felter KVM/native | Felter Docker/native |" in header
    cpu = next(line for line in text.splitlines() if "sysbench cpu" in line)
    assert "| 100 | 50.0 (0.50x) | not run | 10.0 | 8.00 (0.80x) | 0.98 (LINPACK GFLOPS) | 1.00 |" in cpu
    assert "docker: not run: docker: no dockerd" in text
    assert "ran inside the nested host" in text and "not comparable" in text


def test_html_is_self_contained_with_the_plots(tmp_path):
    pytest.importorskip("matplotlib")
    written = report.write(make_run(), tmp_path / "out")
    names = {p.name for p in written}
    assert {"result.json", "table.md", "report.html", "ratios.png", "ratios.svg", "density.png", "density.svg"} <= names
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<svg") == 2 and "<table>" in page and "sysbench cpu" in page
    assert "src=" not in page  # nothing fetched from elsewhere
    assert (tmp_path / "out" / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_suite_column_and_instances_are_one_line_errors():
    assert parse_suites("all")[0] == "startup" and parse_suites("cpu,startup") == ["startup", "cpu"]
    assert parse_columns("vm,native") == ["native", "vm"]
    assert parse_instances("4,1,2") == [1, 2, 4]
    for call, message in ((lambda: parse_suites("cpu,gpu"), "unknown suite 'gpu'"),
                          (lambda: parse_columns("lxc"), "unknown column 'lxc'"),
                          (lambda: parse_instances("0"), "counts from 1 to 64"),
                          (lambda: parse_instances("a,b"), "not a list of numbers")):
        with pytest.raises(VmctlError, match=message):
            call()


def test_memory_merge_marks_guest_ram_mergeable(tmp_path):
    """`memory_merge: true` parses, and GuestMemory.make_mergeable sets KSM's flag (VmFlags mg)."""
    from vmctl.memory import GuestMemory
    from vmctl.spec import load_spec

    path = tmp_path / "m.yaml"
    path.write_text("machines:\n  a:\n    memory_merge: true\n  b: {}\n")
    a, b = load_spec(path).machines
    assert a.memory_merge and not b.memory_merge
    path.write_text("machines:\n  a:\n    memory_merge: often\n")
    with pytest.raises(VmctlError, match="machines.a.memory_merge: expected true or false"):
        load_spec(path)

    memory = GuestMemory([(0, 4 << 20)])
    try:
        memory.make_mergeable()
        start = memory.regions[0].host_address
        smaps = open("/proc/self/smaps").read().split("\n")
        index = next(i for i, line in enumerate(smaps) if line.startswith(f"{start:x}-"))
        flags = next(line for line in smaps[index:] if line.startswith("VmFlags:"))
        assert " mg" in flags and " nh" in flags
    finally:
        memory.close()


def test_ksm_settles_within_a_tolerance_not_on_an_exact_count():
    from vmctl.suite.pagecache import ksm_settled

    assert ksm_settled(38000, 38000)
    assert ksm_settled(38000, 38150)  # guests keep dirtying a few pages: within 1 MiB
    assert ksm_settled(100000, 100900)  # within 1 %
    assert not ksm_settled(38000, 39000)  # still merging
    assert not ksm_settled(-1, 38000) and not ksm_settled(0, 0)  # first look; nothing merged yet


def test_a_rerun_replaces_the_results_and_notes_of_its_suites_and_columns_only():
    base = make_run()
    base.add("cpu_events_per_s", "vm@L1+ksm", 1.0)  # a variant of vm@L1: goes with it
    base.add("ready_s", "vm@L1", 20.0)  # startup: not rerun, stays
    base.notes = ["cpu,memory · vm@L1: failed: fio", "disk: native@L1: not measured: tmpfs", "cpu · native: failed: x",
                  "nested host: density and pagecache with [1, 2] instances"]
    base.failed = "cpu,memory · vm@L1: failed: fio"
    rerun = SuiteRun(["cpu"], False, {"kvm_mode": "nested"})
    rerun.columns = [Column("native", NESTED), Column("vm", NESTED, "VM"), Column("container", NESTED, "container")]
    rerun.add("cpu_events_per_s", "native@L1", 12.0)
    rerun.add("cpu_events_per_s", "vm@L1", 11.0)
    rerun.add("cpu_events_per_s", "container@L1", 12.5)
    base.replace(rerun, "cpu rerun in L1")
    assert base.measurement("cpu_events_per_s", "vm@L1").samples == [11.0]
    assert base.measurement("cpu_events_per_s", "vm@L1+ksm") is None
    assert base.measurement("ready_s", "vm@L1").samples == [20.0]
    assert base.measurement("cpu_events_per_s", "native").samples == [100.0, 110.0, 90.0]
    assert [c.key for c in base.columns][-1] == "container@L1"
    assert base.notes == ["disk: native@L1: not measured: tmpfs", "cpu · native: failed: x",
                          "nested host: density and pagecache with [1, 2] instances", "cpu rerun in L1"]
    assert base.failed == "" and base.environment["reruns"][0]["note"] == "cpu rerun in L1"
