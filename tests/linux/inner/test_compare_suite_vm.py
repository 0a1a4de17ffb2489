"""`vmctl compare --suite --quick` for the vm column (vmctl's VMM) on a host whose /dev/kvm
boots Linux (the nested host here): its own native and container columns beside it, so the
VM's ratios are taken where it ran. One VM boot for startup, one for the steady suites.

The disk and net suites are left out here: in the nested host fio cannot set up its SysV
shared memory in the reference guest kernel and L1's own native column has no loop device
for an O_DIRECT work dir (docs/benchmarks-compare.md, "not measured yet")."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vmctl.images import locate


def test_quick_suite_vm_with_its_own_native_column(tmp_path):
    if not locate("bench").rootfs_qcow2.exists():
        pytest.skip("the bench image is not built: vmctl image rootfs --profile bench")
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, "-m", "vmctl", "compare", "--suite", "startup,cpu,memory",
                          "--only", "native,vm", "--quick", "--json", str(out)],
                         capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [(c["key"], c["status"]) for c in data["columns"]] == [("native@L1", "ok"), ("vm@L1", "ok")] \
        or [(c["key"], c["status"]) for c in data["columns"]] == [("native", "ok"), ("vm", "ok")]
    rows = {(m["row"], m["column"].split("@")[0]) for m in data["measurements"]}
    for row in ("ready_s", "exec_true_s", "cpu_events_per_s", "memory_seq_mib_s", "memory_rnd_mib_s"):
        assert (row, "vm") in rows and (row, "native") in rows, row
    cpu = next(line for line in run.stdout.splitlines() if "sysbench cpu" in line)
    assert cpu.split("|")[5].strip().endswith("x)"), cpu  # the vm cell carries its ratio to native
