"""Pack a directory tree into an ext4 image (mkfs.ext4 -d: no root, no loop mount) and
convert it to a qcow2 base."""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

from .steps import StepContext, digest

MIB = 1 << 20
LABEL = "vmctl-root"


def image_size_mib(used_bytes: int, min_mib: int) -> int:
    """Room for the tree, ext4 metadata and some free space; never below `min_mib`."""
    return max(min_mib, math.ceil(used_bytes * 1.25 / MIB) + 64)


def stable_uuid(key: str) -> str:
    """A file-system UUID derived from the build key: same inputs, same UUID."""
    return str(uuid.UUID(hex=digest("ext4-uuid", key) * 2))


def pack(tree: Path, out: Path, size_mib: int, key: str, ctx: StepContext) -> None:
    """Make `out` an ext4 file system holding `tree`; files end up owned by root."""
    fs_uuid = stable_uuid(key)
    with open(out, "wb") as image:
        image.truncate(size_mib * MIB)  # sparse: only written blocks use host disk
    ctx.run(["mkfs.ext4", "-F", "-q", "-t", "ext4", "-b", "4096", "-m", "0", "-L", LABEL,
             "-U", fs_uuid, "-E", f"hash_seed={fs_uuid},root_owner=0:0", "-d", tree, out],
            "mkfs.ext4")
    foreign = non_root_owned(tree)
    if foreign:  # a tree built without root: make it root's inside the image
        chown_root(out, foreign, ctx)
    ctx.run(["e2fsck", "-fn", out], "e2fsck")


def non_root_owned(tree: Path) -> list[str]:
    """Image paths ('/etc/passwd') of entries not owned by root:root."""
    found = []
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            host = Path(dirpath) / name
            st = host.lstat()
            if st.st_uid or st.st_gid:
                found.append("/" + host.relative_to(tree).as_posix())
    return found


def chown_root(image: Path, paths: list[str], ctx: StepContext) -> None:
    """Set uid and gid 0 on `paths` inside an unmounted ext4 image, with debugfs."""
    script = image.with_name(image.name + ".debugfs")
    lines = []
    for path in paths:
        if '"' in path or "\n" in path:
            raise ctx.fail(f"ext4: cannot express path {path!r} for debugfs")
        lines += [f'sif "{path}" uid 0', f'sif "{path}" gid 0']
    script.write_text("\n".join(lines) + "\n")
    try:
        ctx.run(["debugfs", "-w", "-f", script, image], "debugfs chown")
    finally:
        script.unlink(missing_ok=True)


def to_qcow2(raw: Path, out: Path, ctx: StepContext) -> None:
    """Convert a raw image to an uncompressed qcow2 (qemu-img for now)."""
    ctx.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out], "qemu-img convert")
