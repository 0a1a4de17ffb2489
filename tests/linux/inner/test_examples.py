"""Every VM example in examples/ runs as its comments document (tests/examples_doc.py).

One test per example: its documented commands run in order, exactly as written, each must
succeed, a few outputs are checked, and nothing is left in the state folder afterwards.
The container examples run on the host instead (tests/linux/test_examples_containers.py).
"""

from __future__ import annotations

import pytest
from examples_doc import CONTAINER_EXAMPLES, all_examples, leftovers, run_documented

from vmctl.images import locate

# (example, start of the command) -> text its stdout must contain
EXPECTED = {
    ("throwaway.yaml", "vmctl run examples/throwaway.yaml -- cat"): "vmctl.cmd=",
    ("throwaway.yaml", "vmctl run examples/throwaway.yaml"): "Linux throwaway-run-",
    ("ssh-debian.yaml", "vmctl exec devbox -- python3"): "Python 3.",
    ("ssh-debian.yaml", "curl"): "Directory listing",
    ("data-disk.yaml", "vmctl exec scratch"): "/mnt",
    ("data-disk.yaml", "echo hello | vmctl exec -i scratch"): "hello",
    ("ssh-debian.yaml", "echo 'print(6 * 7)' | vmctl exec -i devbox"): "42",
    ("web-and-db.yaml", "curl"): "hello from web",
    ("web-and-db.yaml", "vmctl exec db"): "database on db",
}

VM_EXAMPLES = [path for path in all_examples() if path.name not in CONTAINER_EXAMPLES]


@pytest.mark.parametrize("path", VM_EXAMPLES, ids=lambda p: p.name)
def test_example_runs_as_documented(path, tmp_path_factory):
    profile = "debian" if "image: debian" in path.read_text() else "busybox"
    if not locate(profile).bzimage.exists() or not (locate(profile).initramfs.exists()
                                                     or locate(profile).rootfs_qcow2.exists()):
        pytest.skip(f"the {profile} reference images are not built")
    state = tmp_path_factory.mktemp("state")  # local (sockets), not on a 9p share
    try:
        done = run_documented(path, state)
        for (name, start), text in EXPECTED.items():
            if name != path.name:
                continue
            outputs = [result.stdout.decode(errors="replace") for command, result in done if command.startswith(start)]
            assert outputs and text in outputs[0], f"{start}: {text!r} not in {outputs}"
        assert leftovers(state) == [], "the documented commands left machines behind"
    finally:
        import os
        import subprocess
        import sys
        from pathlib import Path

        for name in leftovers(state):
            subprocess.run([str(Path(sys.executable).with_name("vmctl")), "rm", name], capture_output=True,
                           env=dict(os.environ, VMCTL_STATE_DIR=str(state)), timeout=120)
