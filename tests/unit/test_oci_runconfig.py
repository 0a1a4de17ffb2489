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
    for bad in ("web", "oci:", "oci:../x", "oci:web@sha256:abc", "oci:web@md5:" + "a" * 32):
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


def test_libvirt_says_oci_images_are_not_taken_yet() -> None:
    from vmctl.backends.libvirt.plan import boot_for, root_image

    spec = parse_spec({"name": "m", "backend": "libvirt", "image": "oci:web"}).machines[0]
    with pytest.raises(VmctlError, match="backend libvirt does not take them yet"):
        root_image(spec)
    with pytest.raises(VmctlError, match="backend libvirt does not take them yet"):
        boot_for(spec)
