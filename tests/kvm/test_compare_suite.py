"""`vmctl compare --suite` end to end on the host: native, container and docker columns
(the docker column starts and stops a dockerd of its own), and Ctrl-C in the middle of the
density suite leaving nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module", autouse=True)
def _needs():
    from vmctl.images import locate

    if os.geteuid() != 0:
        pytest.skip("needs root (overlays, containers, dockerd)")
    if not (locate("bench").rootfs_tree / "usr/bin/sysbench").exists():
        pytest.skip("the bench image is not built: vmctl image rootfs --profile bench")
    if shutil.which("dockerd") is None:
        pytest.skip("Docker Engine is not installed (apt-get install docker.io)")


def _vmctl(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmctl", "compare", *args]


def _leftovers(pid: int) -> list[str]:
    """Everything a run with process id `pid` could have left behind."""
    found = []
    found += [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if "vmctl-suite-" in line]
    found += [str(p) for p in Path("/tmp").glob("vmctl-suite-*") if (p / ".owner-pid").exists()
              and (p / ".owner-pid").read_text() == str(pid)]
    found += [f"link {name}" for name in os.listdir("/sys/class/net") if name == f"vmctldk{pid % 100000}"]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "vmctl-suite-" in cmdline or "suite-container-" in cmdline and f"-{pid}" in cmdline:
                found.append(f"process {entry}: {cmdline[:120]}")
    for root in Path("/sys/fs/cgroup").glob("*/vmctl"):
        found += [str(d) for d in root.iterdir() if d.is_dir() and "suite-container-" in d.name and f"-{pid}-" in d.name]
    return found


def test_quick_suite_native_container_docker(tmp_path):
    out = tmp_path / "report"
    process = subprocess.Popen(_vmctl("--suite", "all", "--quick", "--only", "native,container,docker",
                                      "--instances", "1,2", "--report", str(out)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr[-2000:]
    assert _leftovers(process.pid) == []
    data = json.loads((out / "result.json").read_text())
    assert [c["key"] for c in data["columns"]] == ["native", "container", "docker"]
    assert all(c["status"] == "ok" for c in data["columns"])
    rows = {(m["row"], m["column"]) for m in data["measurements"]}
    for row in ("ready_s", "cpu_events_per_s", "memory_seq_mib_s", "disk_rand_read_qd32_iops",
                "net_tcp_to_instance_mbit_s", "net_rr_latency_us", "redis_get_rps",
                "density_pss_per_instance_mib", "pagecache_extra_reader_mib"):
        for column in ("native", "container", "docker"):
            assert (row, column) in rows, (row, column)
    # the page cache of the shared files is shared: the second container reader adds (almost) none of it
    cache = {m["column"]: m["samples"] for m in data["measurements"] if m["row"] == "pagecache_host_cache_mib"}
    assert all(25 <= v <= 40 for v in cache["container"]), cache  # 32 MiB read by 1, then by 2 instances
    assert data["environment"]["tools"]["sysbench"].startswith("sysbench 1.")
    table = stdout
    assert "| native | container | docker | Felter KVM/native | Felter Docker/native |" in table
    assert "0.98 (LINPACK GFLOPS)" in table
    assert (out / "report.html").read_text().count("<svg") >= 3  # ratios, density, pagecache


def test_ctrl_c_during_density_leaves_nothing(tmp_path):
    process = subprocess.Popen(_vmctl("--suite", "density", "--only", "native,container,docker", "--instances", "3"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        seen = ""
        while time.monotonic() < deadline:  # interrupt while 3 containers start, dockerd running
            line = process.stderr.readline()
            seen += line
            if "density · container: density: 3 instances" in line or not line:
                break
        assert "density · container: density: 3 instances" in seen, seen[-2000:]
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0
    assert "Traceback" not in rest, rest[-2000:]
    assert _leftovers(process.pid) == []
