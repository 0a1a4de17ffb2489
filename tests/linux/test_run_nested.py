"""`vmctl run --nested`: where /dev/kvm cannot boot Linux, the same command runs in the nested
host, with its output and exit status; without --nested it fails at once and says so."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmctl.images import locate

VMCTL = str(Path(sys.executable).with_name("vmctl"))


def test_run_refuses_linux_at_once_and_runs_it_nested(linux_tier, tmp_path):
    if linux_tier.mode != "nested":
        pytest.skip("only where /dev/kvm cannot boot Linux (the nested mode of the linux tier)")
    if not locate("busybox").initramfs.exists():
        pytest.skip("the reference images are not built (vmctl image build)")
    env = dict(os.environ, VMCTL_STATE_DIR=str(tmp_path))
    started = time.monotonic()
    refused = subprocess.run([VMCTL, "run", "--", "uname", "-a"], capture_output=True, text=True, env=env, timeout=60)
    assert refused.returncode == 1 and time.monotonic() - started < 30
    assert refused.stdout == "" and "vmctl run --nested" in refused.stderr
    assert "paravirtual (kvm_pvm)" in refused.stderr
    nested = subprocess.run([VMCTL, "run", "--nested", "--", "sh", "-c", "uname -s; exit 3"], capture_output=True,
                            text=True, env=env, timeout=1200)
    assert nested.returncode == 3, nested.stderr[-2000:]
    assert nested.stdout == "Linux\n"
    assert not list((tmp_path / "machines").glob("run-*"))
