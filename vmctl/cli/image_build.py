"""`vmctl image kernel|rootfs|initramfs|build|paths`: guest images in the cache."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import images
from ..images.rootfs import PROFILES

_RAW = argparse.RawDescriptionHelpFormatter
_CACHE_HELP = "cache directory (default: $VMCTL_CACHE_DIR, else $XDG_CACHE_HOME/vmctl)"


def register(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "kernel", help="build the reference guest kernel (vmlinux and bzImage)",
        formatter_class=_RAW,
        description="Build the microVM guest kernel from Debian's linux-source-6.1 "
        "(tinyconfig + vmctl's fragment). About 7 minutes on 2 cores the first time; "
        "afterwards it is up to date until the fragment or the source package changes.",
        epilog="examples:\n  vmctl image kernel\n  vmctl image kernel --jobs 4 --force",
    )
    p.add_argument("--jobs", "-j", type=int, help="parallel compile jobs (default: CPUs)")
    _common(p)
    p.set_defaults(func=_kernel)

    p = actions.add_parser(
        "rootfs", help="build the base root filesystem (tree, ext4, qcow2)",
        formatter_class=_RAW,
        description="Assemble the root filesystem tree of a profile and pack it as ext4 "
        "and as a qcow2 base. The tree also serves as a container rootfs.",
        epilog="examples:\n  vmctl image rootfs\n  vmctl image rootfs --profile debian",
    )
    _profile(p)
    p.add_argument("--no-qcow2", action="store_true", help="stop after the ext4 image")
    _common(p)
    p.set_defaults(func=_rootfs)

    p = actions.add_parser(
        "initramfs", help="build an initramfs (newc cpio) of the root filesystem",
        formatter_class=_RAW,
        description="Write the rootfs tree as an uncompressed newc cpio, for boots "
        "without a disk.",
        epilog="examples:\n  vmctl image initramfs",
    )
    _profile(p)
    _common(p)
    p.set_defaults(func=_initramfs)

    p = actions.add_parser(
        "build", help="build everything: kernel, rootfs (ext4, qcow2) and initramfs",
        formatter_class=_RAW, description="Run every image step; current ones are skipped.",
        epilog="examples:\n  vmctl image build\n  VMCTL_CACHE_DIR=/srv/cache vmctl image build",
    )
    p.add_argument("--jobs", "-j", type=int, help="parallel kernel compile jobs")
    _profile(p)
    _common(p)
    p.set_defaults(func=_build)

    p = actions.add_parser(
        "paths", help="print where the built images are (builds nothing)",
        formatter_class=_RAW,
        description="Print the cache paths of the kernel, rootfs and initramfs for the "
        "current inputs, and whether each exists.",
        epilog="examples:\n  vmctl image paths\n  vmctl image paths --json",
    )
    _profile(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--cache-dir", type=Path, help=_CACHE_HELP)
    p.set_defaults(func=_paths)

    p = actions.add_parser(
        "prune", help="remove built images that today's inputs no longer use",
        formatter_class=_RAW,
        description="Remove the kernel and rootfs folders of the cache that the current "
        "inputs (kernel fragment, /init, host packages) no longer build into. A folder "
        "that a machine or snapshot overlay has as its backing file, that a record in the "
        "state folder names, or that a running process has open, mapped or mounted is kept "
        "and the reason printed. The kernel source and build folders are never removed.",
        epilog="examples:\n  vmctl image prune --dry-run\n  vmctl image prune",
    )
    p.add_argument("--dry-run", "-n", action="store_true",
                   help="list what would be removed, remove nothing")
    p.add_argument("--cache-dir", type=Path, help=_CACHE_HELP)
    p.set_defaults(func=_prune)


def _profile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=sorted(PROFILES), default="busybox",
                   help="rootfs profile (default: busybox)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--cache-dir", type=Path, help=_CACHE_HELP)


def _kernel(args: argparse.Namespace) -> int:
    where = images.build_kernel(args.cache_dir, force=args.force, jobs=args.jobs)
    print(where.vmlinux)
    print(where.bzimage)
    return 0


def _rootfs(args: argparse.Namespace) -> int:
    where = images.build_rootfs(args.profile, args.cache_dir, force=args.force,
                                qcow2=not args.no_qcow2)
    print(where.rootfs_ext4)
    if not args.no_qcow2:
        print(where.rootfs_qcow2)
    return 0


def _initramfs(args: argparse.Namespace) -> int:
    print(images.build_initramfs(args.profile, args.cache_dir, force=args.force).initramfs)
    return 0


def _build(args: argparse.Namespace) -> int:
    where = images.build_all(args.profile, args.cache_dir, force=args.force, jobs=args.jobs)
    _print_paths(where)
    return 0


def _paths(args: argparse.Namespace) -> int:
    where = images.locate(args.profile, args.cache_dir)
    if args.json:
        data = {**where.as_dict(),
                "exists": {name: path.exists() for name, path in where.artefacts().items()}}
        print(json.dumps(data, indent=2))
    else:
        _print_paths(where)
    return 0


def _prune(args: argparse.Namespace) -> int:
    from .. import paths
    from ..images import prune
    from ..units import human_size

    cache = args.cache_dir or paths.cache_dir()
    entries = prune.scan(cache, paths.state_dir())
    freed = 0
    for entry in entries:
        size = human_size(entry.size)
        if entry.kept_because:
            print(f"kept     {entry.path}  ({size}): {entry.kept_because}")
            continue
        if not args.dry_run:
            prune.remove(entry)
        freed += entry.size
        print(f"{'stale' if args.dry_run else 'removed':8} {entry.path}  ({size})")
    if not entries:
        print(f"nothing to prune in {cache}")
    else:
        print(f"{'would free' if args.dry_run else 'freed'} {human_size(freed)}")
    return 0


def _print_paths(where: images.ImagePaths) -> None:
    for name, path in where.artefacts().items():
        state = "" if path.exists() else "  (not built)"
        print(f"{name:14} {path}{state}")
