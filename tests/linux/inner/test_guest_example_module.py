"""examples/test_guest_example.py (the README's pytest example: a guest with the project folder
mounted and a random host port) runs in its own pytest, as a user would run it, and passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmctl.images import locate

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "test_guest_example.py"


def test_the_readme_style_example_passes(tmp_path):
    if not locate("busybox").initramfs.exists():
        pytest.skip("the busybox reference images are not built (vmctl image build)")
    state = tmp_path / "state"  # sockets: a local file system
    env = dict(os.environ, VMCTL_STATE_DIR=str(state))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                           str(EXAMPLE)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout + done.stderr
    machines = state / "machines"
    left = [p.name for p in machines.iterdir() if not p.name.startswith(".")] if machines.exists() else []
    assert left == [], "the example left machines behind"
