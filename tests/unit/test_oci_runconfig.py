"""`image: oci:NAME[@sha256:…]` references and what an image's config makes a machine run."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmctl.errors import VmctlError
from vmctl.oci.manifest import ImageConfig
from vmctl.oci.runconfig import OciImage, parse_ref, process, resolve_user
from vmctl.spec import parse_spec


def test_parse_ref() -> None:
    assert parse_ref("oci:web") == ("web", None)
    assert parse_ref("oci:lib/web:1.2@sha256:" + "a" * 64) == ("lib/web:1.2", "sha256:" + "a" * 64)
    for bad in ("web", "oci:", "oci:a/../x", "oci:web@sha256:abc", "oci:web@md5:" + "a" * 32):
        with pytest.raises(VmctlError):
            parse_ref(bad)


def test_spec_accepts_oci_images_and_names_the_line_of_a_bad_one() -> None:
    spec = parse_spec({"name": "m", "backend": "container", "image": "oci:web"}).machines[0]
    assert spec.image == "oci:web"
    with pytest.raises(VmctlError, match="image.*sha256"):
        parse_spec({"name": "m", "image": "oci:web@sha256:zz"})


def image(tmp_path: Path, **config) -> OciImage:
    layer = tmp_path / "layer"
    (layer / "etc").mkdir(parents=True, exist_ok=True)
    (layer / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nweb:x:33:44::/var/www:/bin/sh\n")
    (layer / "etc/group").write_text("root:x:0:\nstaff:x:50:\n")
    return OciImage("oci:t", None, ImageConfig(**config), (layer,))  # type: ignore[arg-type]


def test_process_follows_docker_rules(tmp_path: Path) -> None:
    img = image(tmp_path, env=("PATH=/x", "A=1"), entrypoint=("/entry",), cmd=("default",), working_dir="srv", user="web")
    run = process(img, (), {})
    assert run.args == ("/entry", "default") and run.cwd == "/srv" and (run.uid, run.gid) == (33, 44)
    assert run.env == {"PATH": "/x", "A": "1"}
    run = process(img, ("other", "arg"), {"A": "2"})
    assert run.args == ("/entry", "other", "arg") and run.env["A"] == "2"
    with pytest.raises(VmctlError, match="no Entrypoint or Cmd"):
        process(image(tmp_path), (), {})


def test_resolve_user(tmp_path: Path) -> None:
    lowers = image(tmp_path).lowers
    assert resolve_user("", lowers, "t") == (0, 0)
    assert resolve_user("web:staff", lowers, "t") == (33, 50)
    assert resolve_user("1234:5", lowers, "t") == (1234, 5)
    assert resolve_user("33", lowers, "t") == (33, 44)
    with pytest.raises(VmctlError, match="no user 'nobody'"):
        resolve_user("nobody", lowers, "t")


def test_libvirt_domain_of_an_oci_image(tmp_path, monkeypatch) -> None:
    """Layers as read-only raw disks (vda… bottom first), the upper qcow2 next, direct kernel
    boot with the first-stage initramfs and vmctl.layers=N."""
    import os

    if os.geteuid() != 0:
        pytest.skip("unpacking layers needs root")
    from vmctl.backends.libvirt.disks import local_disks
    from vmctl.backends.libvirt.plan import boot_for
    from vmctl.guest_contract import ReferenceImages
    from vmctl.oci.store import ImageStore
    from vmctl.oci.write import Layer, write_layout

    monkeypatch.setenv("VMCTL_OCI_DIR", str(tmp_path / "oci"))
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"k")
    monkeypatch.setattr("vmctl.backends.libvirt.plan.reference_images", lambda profile: ReferenceImages(kernel, None, None))
    write_layout(tmp_path / "img", [Layer().file("a", "a").tar(), Layer().file("b", "b").tar()], cmd=["/b"])
    ImageStore().import_image(tmp_path / "img")
    spec = parse_spec({"name": "m", "backend": "libvirt", "image": "oci:img"}).machines[0]
    booted, initrd, cmdline = boot_for(spec)
    assert booted == str(kernel) and "initramfs-" in initrd and "vmctl.layers=2" in cmdline
    (tmp_path / "m").mkdir()
    disks = local_disks(spec, tmp_path / "m")
    assert [(d.target, d.read_only, d.layers[0].format) for d in disks] == [
        ("vda", True, "raw"), ("vdb", True, "raw"), ("vdc", False, "qcow2")]
    assert disks[0].layers[0].path.endswith(".ext4") and (tmp_path / "m/oci-layers.json").exists()


def test_a_layout_path_is_imported_on_use(tmp_path, monkeypatch) -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("unpacking layers needs root")
    from vmctl.oci.runconfig import open_image
    from vmctl.oci.write import Layer, write_layout

    monkeypatch.setenv("VMCTL_OCI_DIR", str(tmp_path / "oci"))
    write_layout(tmp_path / "img", [Layer().file("a", "a").tar()], cmd=["/a"])
    assert parse_ref(f"oci:{tmp_path}/img") == (f"{tmp_path}/img", None)
    first = open_image(f"oci:{tmp_path}/img")
    again = open_image(f"oci:{tmp_path}/img")
    assert first.record.manifest == again.record.manifest and first.config.cmd == ("/a",)
    assert (first.lowers[0] / "a").read_text() == "a"
