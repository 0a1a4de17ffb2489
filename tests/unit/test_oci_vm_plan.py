"""The pieces of an OCI image as a VM that need no guest: stage-2 /init, layer disks, the script."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vmctl.guest_contract import GUEST_AGENT
from vmctl.oci import vm
from vmctl.oci.manifest import ImageConfig
from vmctl.oci.runconfig import OciImage, Process


def test_stage2_init_is_vmctl_init_on_its_own_busybox() -> None:
    text = vm.stage2_init()
    assert "BB=/.vmctl/busybox" in text and '$BB sh -c "$(decode "$CMD")"' in text
    assert "/bin/sh -c" not in text.split("print_config()")[1]  # the image may have no /bin/sh


def test_guest_script_runs_the_image_command_as_its_user() -> None:
    image = OciImage("oci:x", None, ImageConfig(), ())  # type: ignore[arg-type]
    script = vm.guest_script(image, Process(("/srv/app", "a b"), {"PATH": "/bin", "X": "1 2"}, "/srv", 33, 44), GUEST_AGENT)
    assert "B=/.vmctl/busybox" in script and "$B sh $t.sh" in script and "/bin/sh $t.sh" not in script
    assert "export X='1 2'" in script and "cd /srv" in script
    assert script.endswith("-c 33:44 -x /srv/app -- 'a b'")
    root = vm.guest_script(image, Process(("cat", "/etc/x"), {}, "/", 0, 0), GUEST_AGENT)
    assert root.endswith("exec cat /etc/x")


@pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts (char 0:0) and trusted.* xattrs need root")
def test_layer_disk_keeps_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    from vmctl.oci.store import ImageStore
    from vmctl.oci.write import Layer, write_layout

    write_layout(tmp_path / "img", [Layer().dir("d").file("d/x", "x").file("gone", "g").tar(),
                                    Layer().whiteout("gone").dir("d").opaque("d").file("d/y", "y").tar()])
    store = ImageStore(tmp_path / "store")
    record = store.import_image(tmp_path / "img")
    disk = vm.layer_disk(store, record.diff_ids[1])
    assert vm.layer_disk(store, record.diff_ids[1]) == disk  # made once
    listing = subprocess.run(["debugfs", "-R", "ls -l /", str(disk)], capture_output=True, text=True).stdout
    assert " 20000 " in listing and "gone" in listing  # a char device 0:0
    xattrs = subprocess.run(["debugfs", "-R", "ea_list /d", str(disk)], capture_output=True, text=True).stdout
    assert 'trusted.overlay.opaque (1) = "y"' in xattrs
    assert subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True).returncode == 0
    cpio = vm.initramfs(store)
    assert cpio.stat().st_size > 500_000 and vm.initramfs(store) == cpio
