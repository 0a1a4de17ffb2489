"""A short soak (issue 19 item 5): tiny guests and containers through up/run/exec/down/rm,
commands and VMMs/monitors killed with SIGKILL at random points; nothing may leak (TAP,
veth, NAT rule, cgroup, mount, state folder, process, fd) and `vmctl rm` must always clean
up. The long run and the figures: benchmarks/soak.py, docs/reliability.md."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


def _load():
    spec = importlib.util.spec_from_file_location("vmctl_bench_soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("gcc") is None, reason="needs root and gcc")
@pytest.mark.parametrize("seed", [3])
def test_short_soak_leaks_nothing(seed, capsys, monkeypatch):
    soak = _load()
    status = soak.main(["--cycles", "3", "--parallel", "3", "--in-process", "3", "--seed", str(seed)])
    report = capsys.readouterr().out
    assert status == 0, report
    assert '"leaks": {}' in report and '"rm_failures": []' in report


def test_the_audit_sees_a_leak(tmp_path):
    """The audit itself can fail: a mount and a process left under the state folder are found."""
    import subprocess
    import time

    soak = _load()
    state = tmp_path / "state"
    (state / "machines").mkdir(parents=True)
    before = soak.host_snapshot(state)
    leftover = state / "machines" / "x"
    leftover.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", str(leftover)])
    try:
        time.sleep(0.2)
        found = soak.leaks(before, soak.host_snapshot(state))
        assert found["state_folders"] == ["x"]
        assert any(str(holder.pid) in line for line in found["processes"])
    finally:
        holder.kill()
        holder.wait()


def test_rm_of_a_running_container_with_a_truncated_container_json_releases_everything(tmp_path, vmctl_cli,
                                                                                      monkeypatch):
    soak = _load()
    if not soak.containers_possible():
        pytest.skip("containers need root, an OCI runtime and the busybox base tree")
    state = tmp_path / "state"
    monkeypatch.setenv("VMCTL_STATE_DIR", str(state))
    spec = tmp_path / "c.yaml"
    spec.write_text("machines:\n  c:\n    backend: container\n    memory: 48M\n")
    assert vmctl_cli("up", str(spec), "c").returncode == 0
    folder = state / "machines" / "c"
    container_id = json.loads((folder / "container.json").read_text())["container_id"]
    assert str(folder) in open("/proc/mounts").read()
    (folder / "container.json").write_text('{"machine": "c", "contai')
    removed = vmctl_cli("rm", "c")
    assert removed.returncode == 0, removed.stderr
    assert removed.stderr.count("container.json: unreadable") == 1 and "Traceback" not in removed.stderr
    assert not folder.exists() and str(folder) not in open("/proc/mounts").read()
    assert not list(Path("/sys/fs/cgroup").rglob(container_id))
    assert soak.host_snapshot(state)["processes"] == []
