"""`vmctl image import|ls|rm|export` against images written at test time, and hostile ones.

Every hostile case must fail with one line naming the blob (or file) and the entry, write
nothing outside the store, and leave the store as it was (no image, blob, layer or temp)."""

from __future__ import annotations

import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from vmctl.errors import VmctlError
from vmctl.oci import digest as dg
from vmctl.oci.store import ImageStore
from vmctl.oci.unpack import OPAQUE_XATTR, is_whiteout
from vmctl.oci.write import Layer, export, tar_directory, write_layout

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking layers (owners, whiteouts) needs root")


def base_layer() -> Layer:
    return (Layer().dir("bin").file("bin/tool", "#!/bin/sh\necho tool\n", mode=0o755)
            .dir("etc").file("etc/os-release", "ID=vmctl-test\n").file("etc/gone", "old\n")
            .dir("opt").file("opt/a", "a").file("opt/b", "b").dir("dev").device("dev/null", 1, 3, mode=0o666)
            .file("data", b"\x00\x01" * 5000))


def top_layer() -> Layer:
    return (Layer().dir("etc").whiteout("etc/gone").dir("opt").opaque("opt").file("opt/c", "c")
            .dir("bin").hardlink("bin/tool2", "bin/tool").file("bin/suid", "s", mode=0o4755, uid=1000, gid=100)
            .symlink("bin/abs", "/etc/os-release").file("bin/own", "o", uid=1234, gid=5678)
            .file("xattr", "x", xattrs={"user.note": "hello"}).fifo("fifo")
            .file("same1", "same").hardlink("same2", "same1"))


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "store")


def snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".lock" not in p.name) if root.exists() else []


def test_import_layout_unpacks_each_layer_with_overlay_semantics(tmp_path: Path, store: ImageStore) -> None:
    write_layout(tmp_path / "img", [base_layer().tar(), top_layer().tar()], cmd=["/bin/tool"], env=["A=1"], working_dir="/opt")
    record = store.import_image(tmp_path / "img")
    assert record.name == "img" and len(record.layers) == 2
    bottom, top = (store.layer_dir(d) for d in record.diff_ids)
    assert (bottom / "etc/gone").read_text() == "old\n"  # lower layers are never changed
    assert is_whiteout(top / "etc/gone")
    assert os.getxattr(top / "opt", OPAQUE_XATTR) == b"y"
    suid = os.lstat(top / "bin/suid")
    assert stat.S_IMODE(suid.st_mode) == 0o4755 and (suid.st_uid, suid.st_gid) == (1000, 100)
    assert (os.lstat(top / "bin/own").st_uid, os.lstat(top / "bin/own").st_gid) == (1234, 5678)
    assert os.readlink(top / "bin/abs") == "/etc/os-release"
    assert os.getxattr(top / "xattr", "user.note") == b"hello"
    assert stat.S_ISFIFO(os.lstat(top / "fifo").st_mode)
    assert os.lstat(top / "same1").st_ino == os.lstat(top / "same2").st_ino  # a hard link in one layer
    assert (top / "bin/tool2").read_text() == "#!/bin/sh\necho tool\n"  # to a lower file: copied up
    null = os.lstat(bottom / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    config = store.config(record)
    assert config.cmd == ("/bin/tool",) and config.working_dir == "/opt" and config.environment() == {"A": "1"}


def test_two_images_share_the_base_layer_and_rm_keeps_what_is_used(tmp_path: Path, store: ImageStore) -> None:
    write_layout(tmp_path / "one", [base_layer().tar(), top_layer().tar()])
    write_layout(tmp_path / "two", [base_layer().tar(), Layer().file("two", "2").tar()], gzip_layers=False)
    one, two = store.import_image(tmp_path / "one"), store.import_image(tmp_path / "two")
    assert one.diff_ids[0] == two.diff_ids[0]
    rows = {row["name"]: row for row in store.usage()}
    assert rows["one"]["shared_bytes"] > 0 and rows["one"]["shared_bytes"] == rows["two"]["shared_bytes"]
    base = store.layer_dir(one.diff_ids[0])
    inode = os.stat(base / "data").st_ino
    removed = store.remove("one")
    assert any(item.startswith("layer") for item in removed)
    assert not store.layer_dir(one.diff_ids[1]).exists() and os.stat(base / "data").st_ino == inode
    store.remove("two")
    assert not list((store.root / "blobs/sha256").iterdir()) and not list((store.root / "layers").iterdir())


def test_multi_platform_index_picks_linux_amd64(tmp_path: Path, store: ImageStore) -> None:
    layout = tmp_path / "multi"
    amd = write_layout(layout, [base_layer().tar()])
    amd["platform"] = {"os": "linux", "architecture": "amd64"}
    arm = dict(amd, digest="sha256:" + "1" * 64, platform={"os": "linux", "architecture": "arm64"})
    index = {"schemaVersion": 2, "manifests": [arm, amd]}
    # the index itself is a blob the top-level index points to (nested index)
    data = json.dumps(index).encode()
    (layout / "blobs/sha256" / dg.hex_part(dg.of_bytes(data))).write_bytes(data)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": dg.of_bytes(data), "size": len(data)}]}))
    record = store.import_image(layout, "multi")
    assert record.manifest == amd["digest"]


def test_docker_save_and_oci_archive_import_and_export_round_trip(tmp_path: Path, store: ImageStore) -> None:
    write_layout(tmp_path / "src", [base_layer().tar(), top_layer().tar()], cmd=["/bin/tool"])
    original = store.import_image(tmp_path / "src", "src")
    export(store, "src", tmp_path / "docker.tar", "docker")
    export(store, "src", tmp_path / "oci.tar", "oci")
    with tarfile.open(tmp_path / "docker.tar") as archive:
        manifest = json.loads(archive.extractfile("manifest.json").read())
    assert manifest[0]["RepoTags"] == ["src:latest"]
    from_docker = store.import_image(tmp_path / "docker.tar")
    from_oci = store.import_image(tmp_path / "oci.tar")
    assert from_docker.name == "docker" and from_oci.name == "oci"
    assert from_docker.diff_ids == original.diff_ids == from_oci.diff_ids
    assert from_docker.config == original.config and from_oci.manifest == original.manifest


# --- hostile input -----------------------------------------------------------------------

def import_fails(store: ImageStore, source: Path, *expected: str) -> str:
    before = snapshot(store.root)
    with pytest.raises(VmctlError) as caught:
        store.import_image(source, "hostile")
    message = str(caught.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, message
    after = [p for p in snapshot(store.root) if not p.startswith("tmp")]
    assert after == [p for p in before if not p.startswith("tmp")], "the store changed"
    assert not list((store.root / "tmp").iterdir()) if (store.root / "tmp").exists() else True
    assert "hostile" not in store.names()
    return message


def layout_with(tmp_path: Path, *layers: Layer | bytes, **kwargs) -> Path:
    root = tmp_path / "bad"
    write_layout(root, [layer if isinstance(layer, bytes) else layer.tar() for layer in layers], **kwargs)
    return root


def blob_of(root: Path, digest: str) -> Path:
    return root / "blobs/sha256" / dg.hex_part(digest)


def manifest_of(root: Path) -> dict:
    index = json.loads((root / "index.json").read_text())
    return json.loads(blob_of(root, index["manifests"][0]["digest"]).read_bytes())


def test_blob_digest_mismatch(tmp_path: Path, store: ImageStore) -> None:
    root = layout_with(tmp_path, base_layer())
    layer = manifest_of(root)["layers"][0]["digest"]
    data = bytearray(blob_of(root, layer).read_bytes())
    data[-1] ^= 1
    blob_of(root, layer).write_bytes(bytes(data))
    import_fails(store, root, f"blob {layer[:19]}", "digest mismatch")


def test_truncated_archive(tmp_path: Path, store: ImageStore) -> None:
    write_layout(tmp_path / "ok", [base_layer().tar()])
    tar_directory(tmp_path / "ok", tmp_path / "whole.tar")
    data = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    import_fails(store, tmp_path / "cut.tar", "cut.tar")


@pytest.mark.parametrize("cut, entry", [(1536, "bin/tool"), (2565, "etc/os-release")])  # after an entry; in its data
def test_truncated_layer_tar_with_a_matching_digest(tmp_path: Path, store: ImageStore, cut: int, entry: str) -> None:
    tar = base_layer().tar()[:cut]  # the layout's digests are of the cut tar: only the tar can tell
    root = layout_with(tmp_path, tar, gzip_layers=False)
    import_fails(store, root, "blob sha256:", "(layer 1/1)", f"entry {entry!r}", "truncated")


def test_wrong_platform(tmp_path: Path, store: ImageStore) -> None:
    root = layout_with(tmp_path, base_layer(), platform=("linux", "arm64"))
    import_fails(store, root, "linux/arm64", "not linux/amd64")
    index = json.loads((root / "index.json").read_text())
    index["manifests"][0]["platform"] = {"os": "linux", "architecture": "arm64"}
    (root / "index.json").write_text(json.dumps(index))
    import_fails(store, root, "no linux/amd64 image", "linux/arm64")


@pytest.mark.parametrize("entry, layer, expected", [
    ("../escape", Layer().file("../escape-oci-test", "x"), "leaves the layer root"),
    ("/abs", Layer().file("/tmp/abs-oci-test", "x"), "absolute path"),
    ("etc/passwd via symlink", Layer().symlink("esc", "/tmp").file("esc/oci-write-through", "x"), "written through the symlink 'esc'"),
    ("relative symlink", Layer().dir("d").symlink("d/up", "../../..").file("d/up/tmp/oci-up", "x"), "written through the symlink 'd/up'"),
    ("hardlink outside", Layer().hardlink("pw", "../../../../etc/passwd"), "outside the layer"),
    ("hardlink absolute", Layer().hardlink("pw", "/etc/passwd"), "absolute path"),
    ("hardlink through symlink", Layer().symlink("e", "/etc").hardlink("pw", "e/passwd"), "through a symlink"),
    ("device", Layer().device("disk", 8, 0, block=True), "device node outside /dev"),
    ("raw whiteout", Layer().device("w", 0, 0), "raw overlayfs whiteout"),
    ("trusted xattr", Layer().file("x", "x", xattrs={"trusted.overlay.redirect": "/etc"}), "trusted.overlay.redirect"),
])
def test_layer_escapes(tmp_path: Path, store: ImageStore, entry: str, layer: Layer, expected: str) -> None:
    root = layout_with(tmp_path, base_layer(), layer)
    layer_digest = manifest_of(root)["layers"][1]["digest"]
    message = import_fails(store, root, f"blob {layer_digest[:19]} (layer 2/2)", "entry '", expected)
    assert message.count("entry") == 1
    for outside in ("/tmp/escape-oci-test", "/tmp/abs-oci-test", "/tmp/oci-write-through", "/tmp/oci-up"):
        assert not os.path.lexists(outside)


def test_whiteout_of_a_missing_path(tmp_path: Path, store: ImageStore) -> None:
    root = layout_with(tmp_path, base_layer(), Layer().dir("etc").whiteout("etc/never-there"))
    import_fails(store, root, "(layer 2/2)", "entry 'etc/.wh.never-there'", "do not have")


def test_huge_declared_size(tmp_path: Path, store: ImageStore) -> None:
    info = tarfile.TarInfo("huge")
    info.size = 1 << 42  # 4 TiB declared, a few bytes given
    tar = info.tobuf(tarfile.PAX_FORMAT) + b"x" * 1024 + b"\0" * 1024
    root = layout_with(tmp_path, base_layer(), tar, gzip_layers=False)
    import_fails(store, root, "(layer 2/2)", "entry 'huge'", f"declares {1 << 42} bytes")


def test_manifest_naming_files_outside_a_docker_archive(tmp_path: Path, store: ImageStore) -> None:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as out:
        data = json.dumps([{"Config": "../../etc/passwd", "Layers": []}]).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))
    import_fails(store, archive, "manifest.json[0].Config", "leaves the image")


def test_diff_id_mismatch(tmp_path: Path, store: ImageStore) -> None:
    root = layout_with(tmp_path, base_layer())
    manifest = manifest_of(root)
    config_path = blob_of(root, manifest["config"]["digest"])
    config = json.loads(config_path.read_bytes())
    config["rootfs"]["diff_ids"][0] = "sha256:" + "2" * 64
    data = json.dumps(config).encode()
    blob_of(root, dg.of_bytes(data)).write_bytes(data)
    manifest["config"].update(digest=dg.of_bytes(data), size=len(data))
    manifest_data = json.dumps(manifest).encode()
    blob_of(root, dg.of_bytes(manifest_data)).write_bytes(manifest_data)
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": dg.of_bytes(manifest_data), "size": len(manifest_data)}]}))
    import_fails(store, root, "(layer 1/1)", "diff_id is sha256:222222222222")


def test_gzip_bomb_is_bounded_by_the_free_space(tmp_path: Path, store: ImageStore) -> None:
    info = tarfile.TarInfo("zeros")
    info.size = 1 << 41
    header = info.tobuf(tarfile.PAX_FORMAT)
    root = layout_with(tmp_path, base_layer(), header + b"\0" * (1 << 16))
    import_fails(store, root, "(layer 2/2)", "entry 'zeros'", "more than")


@pytest.mark.skipif(not __import__("shutil").which("umoci"), reason="umoci is not installed (Debian package umoci)")
def test_layout_made_by_umoci(tmp_path: Path, store: ImageStore) -> None:
    """An image another tool wrote: two layers, the second deleting a file of the first."""
    import subprocess

    def umoci(*args: str) -> None:
        subprocess.run(["umoci", *args], check=True, capture_output=True)

    layout, bundle = tmp_path / "layout", tmp_path / "bundle"
    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:t")
    for step in ("add", "delete"):
        umoci("unpack", "--image", f"{layout}:t", str(bundle))
        if step == "add":
            (bundle / "rootfs/etc").mkdir()
            (bundle / "rootfs/etc/keep").write_text("keep\n")
            (bundle / "rootfs/etc/drop").write_text("drop\n")
        else:
            (bundle / "rootfs/etc/drop").unlink()
        umoci("repack", "--image", f"{layout}:t", str(bundle))
        __import__("shutil").rmtree(bundle)
    record = store.import_image(layout, "umoci")
    assert len(record.layers) == 2
    top = store.layer_dir(record.diff_ids[-1])
    assert is_whiteout(top / "etc/drop")
    assert (store.layer_dir(record.diff_ids[0]) / "etc/keep").read_text() == "keep\n"
