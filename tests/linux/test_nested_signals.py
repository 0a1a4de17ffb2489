"""Ctrl-C (or SIGTERM) of `python -m vmctl.nested` ends it cleanly: the command's output so
far is printed, no traceback, QEMU is gone and the run's temp dir removed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _ours(pid: int) -> Path | None:
    """The run's temp dir: scratch.make writes the owner's pid into it."""
    for folder in Path("/tmp").glob("vmctl-nested-*"):
        try:
            if (folder / ".owner-pid").read_text().strip() == str(pid):
                return folder
        except OSError:
            continue
    return None


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_nested_run_keeps_the_output_and_leaves_nothing(linux_tier, sig, tmp_path):
    if linux_tier.mode != "nested":
        pytest.skip("the nested host is only used where /dev/kvm cannot boot Linux")
    process = subprocess.Popen(
        [sys.executable, "-m", "vmctl.nested", "--memory", "1024", "--", "sh", "-c",
         "echo partial-output; echo partial-error >&2; sleep 600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 400
        work = None
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(1)
            work = work or _ours(process.pid)
            if work is not None and (work / "io/stdout").exists() and (work / "io/stdout").stat().st_size:
                break
        assert work is not None and process.poll() is None, "the nested run did not start its command"
        qemu = _children(process.pid)
        process.send_signal(sig)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr
    assert stdout == "partial-output\n"
    assert "partial-error" in stderr and "interrupted" in stderr
    assert not work.exists()  # the run's temp dir is removed
    assert qemu and not [pid for pid in qemu if Path(f"/proc/{pid}").exists()]  # QEMU is gone
