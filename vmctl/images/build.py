"""Build steps over the cache: kernel, rootfs tree, ext4, qcow2, initramfs.

Each step is skipped when its output exists (its path already encodes a hash of its
inputs); `force` rebuilds the named step and the packed images made from it.
"""

from __future__ import annotations

from pathlib import Path

from . import cpio, ext4, kernel, rootfs
from .layout import ImagePaths, locate
from .steps import Reporter, StepContext, atomic_output, require_packages, stderr_reporter

CONSOLE_NODES = (cpio.char_device("dev/console", 5, 1, 0o600),  # init's stdio, before
                 cpio.char_device("dev/null", 1, 3, 0o666))      # devtmpfs is mounted


def build_kernel(cache: Path | None = None, report: Reporter = stderr_reporter,
                 force: bool = False, jobs: int | None = None) -> ImagePaths:
    where = locate(cache=cache)
    kernel.build(where.cache, report, force=force, jobs=jobs)
    return where


def build_rootfs(profile: str = "busybox", cache: Path | None = None,
                 report: Reporter = stderr_reporter, force: bool = False,
                 qcow2: bool = True) -> ImagePaths:
    """The tree, its ext4 image and (unless qcow2=False) the qcow2 base."""
    where = locate(profile, cache)
    prof = rootfs.profile(profile)
    tree = rootfs.build_tree(prof, where.cache, report, force=force)
    ctx = StepContext("ext4", where.rootfs_log, report)
    if where.rootfs_ext4.exists() and not force:
        ctx.say(f"up to date ({where.rootfs_ext4})")
    else:
        require_packages(ctx, ("e2fsprogs",))
        size = ext4.image_size_mib(rootfs.tree_size(tree), prof.min_size_mib)
        ctx.say(f"packing {size} MiB ext4 (log: {ctx.log})")
        with atomic_output(where.rootfs_ext4) as tmp:
            ext4.pack(tree, tmp, size, where.rootfs_dir.name, ctx)
        force = True  # the qcow2 below is made from this new ext4
    if qcow2:
        ctx = StepContext("qcow2", where.rootfs_log, report)
        if where.rootfs_qcow2.exists() and not force:
            ctx.say(f"up to date ({where.rootfs_qcow2})")
        else:
            require_packages(ctx, ("qemu-utils",))
            ctx.say("converting ext4 to qcow2")
            with atomic_output(where.rootfs_qcow2) as tmp:
                ext4.to_qcow2(where.rootfs_ext4, tmp, ctx)
    return where


def build_initramfs(profile: str = "busybox", cache: Path | None = None,
                    report: Reporter = stderr_reporter, force: bool = False,
                    force_tree: bool | None = None) -> ImagePaths:
    """An uncompressed newc initramfs of the rootfs tree, with /dev/console in it.

    `force` rebuilds the archive and, unless force_tree=False, the tree too.
    """
    where = locate(profile, cache)
    prof = rootfs.profile(profile)
    force_tree = force if force_tree is None else force_tree
    tree = rootfs.build_tree(prof, where.cache, report, force=force_tree)
    ctx = StepContext("initramfs", where.rootfs_log, report)
    if where.initramfs.exists() and not force:
        ctx.say(f"up to date ({where.initramfs})")
        return where
    ctx.say(f"writing newc cpio (log: {ctx.log})")
    entries = cpio.tree_entries(tree)
    present = {entry.path for entry in entries}  # debootstrap trees already have /dev nodes
    entries += [node for node in CONSOLE_NODES if node.path not in present]
    with atomic_output(where.initramfs) as tmp, open(tmp, "wb") as out:
        size = cpio.write(entries, out, mtime=rootfs.FIXED_MTIME)
    ctx.note(f"initramfs: {len(entries)} entries, {size} bytes")
    return where


def build_all(profile: str = "busybox", cache: Path | None = None,
              report: Reporter = stderr_reporter, force: bool = False,
              jobs: int | None = None) -> ImagePaths:
    build_kernel(cache, report, force=force, jobs=jobs)
    build_rootfs(profile, cache, report, force=force)
    # the tree was just rebuilt if forced: only the archive needs redoing
    return build_initramfs(profile, cache, report, force=force, force_tree=False)
