"""The container examples run as their comments document, on this host (tests/examples_doc.py).

Containers need no hardware KVM, so these run here whatever the linux tier's mode.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from examples_doc import CONTAINER_EXAMPLES, EXAMPLES, leftovers, run_documented

from vmctl.images import locate


@pytest.mark.parametrize("name", CONTAINER_EXAMPLES)
def test_container_example_runs_as_documented(name, tmp_path):
    if os.geteuid() != 0 or not (shutil.which("crun") or shutil.which("runc")):
        pytest.skip("containers need root and crun or runc")
    if not (locate("busybox").rootfs_tree / "bin").is_dir():
        pytest.skip("the busybox tree is not built (vmctl image build)")
    try:
        done = dict(run_documented(EXAMPLES / name, tmp_path))
        if name == "container.yaml":
            up = done["vmctl up examples/container.yaml box && vmctl ps && vmctl exec box -- ip addr"].stdout.decode()
            assert "box" in up and "running" in up and "inet " in up
            job = done["vmctl run examples/container.yaml --name job"].stdout.decode()
            assert job.startswith("hi from job")
        assert leftovers(tmp_path) == []
    finally:
        for machine in leftovers(tmp_path):
            subprocess.run([str(Path(sys.executable).with_name("vmctl")), "rm", machine], capture_output=True,
                           env=dict(os.environ, VMCTL_STATE_DIR=str(tmp_path)), timeout=120)
