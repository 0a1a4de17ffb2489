"""VMCTL_PROFILE: one pstats file per VMM thread, nothing when unset."""

from __future__ import annotations

import os
import pstats
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SCRIPT = """
import threading
from vmctl.vmm import profiling
on = profiling.install()
def work():
    sum(range(100000))
thread = threading.Thread(target=work, name="worker")
thread.start(); thread.join()
profiling.dump()
print(on)
"""


def test_every_thread_gets_its_profile_file_only_when_asked(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "VMCTL_PROFILE"}
    off = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    assert off.stdout.strip() == "False"
    folder = tmp_path / "profiles"
    on = subprocess.run([sys.executable, "-c", SCRIPT], env={**env, "VMCTL_PROFILE": str(folder)},
                        capture_output=True, text=True, check=True)
    assert on.stdout.strip() == "True"
    names = sorted(path.name.split("-")[1] for path in folder.iterdir())
    assert names == ["MainThread", "worker"]
    worker = next(folder.glob("*-worker-*.prof"))
    functions = {name for _, _, name in pstats.Stats(str(worker)).stats}  # type: ignore[attr-defined]
    assert "work" in functions
