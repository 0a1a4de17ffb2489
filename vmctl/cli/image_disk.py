"""`vmctl image create|overlay|info|check|commit|rebase|convert|map`: qcow2 disks."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..disk.qcow2 import check as check_mod
from ..disk.qcow2 import ops
from ..disk.qcow2.create import CreateOptions, create, create_overlay
from ..errors import VmctlError
from ..units import format_size, parse_size

_RAW = argparse.RawDescriptionHelpFormatter


def register(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "create", help="create an empty qcow2 (or raw) disk, or a qcow2 copy of a raw file",
        formatter_class=_RAW,
        description="Create a new disk image. With --from, the new qcow2 holds the content of "
        "an existing image (all-zero clusters are left unallocated).",
        epilog="examples:\n  vmctl image create base.qcow2 10G\n"
        "  vmctl image create --from rootfs.img base.qcow2\n"
        "  vmctl image create --cluster-size 4K --compat 0.10 old.qcow2 1G",
    )
    p.add_argument("file", help="image to create")
    p.add_argument("size", nargs="?", help="virtual size (512M, 10G, ...); default: --from's")
    p.add_argument("--from", dest="source", metavar="IMAGE", help="copy this image's content")
    p.add_argument("-f", "--format", choices=("qcow2", "raw"), default="qcow2")
    _add_layout_options(p)
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=_create)

    p = actions.add_parser(
        "overlay", help="create a thin copy-on-write overlay on a base image",
        formatter_class=_RAW,
        description="Create a qcow2 overlay whose unwritten clusters read from BASE. The "
        "backing path is stored relative to the overlay's directory unless --absolute. "
        "Many overlays can share one base; the base is only ever opened read-only.",
        epilog="examples:\n  vmctl image overlay base.qcow2 vm1.qcow2\n"
        "  vmctl image overlay --absolute /srv/base.img /tmp/vm2.qcow2",
    )
    p.add_argument("base", help="backing image (qcow2 or raw)")
    p.add_argument("overlay", help="overlay to create")
    p.add_argument("--absolute", action="store_true", help="store an absolute backing path")
    _add_layout_options(p)
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=_overlay)

    p = actions.add_parser(
        "info", help="show size, format and backing file of an image",
        formatter_class=_RAW, description="Describe an image (same fields as `qemu-img info`).",
        epilog="examples:\n  vmctl image info vm1.qcow2\n  vmctl image info --json vm1.qcow2",
    )
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print JSON (qemu-img's keys)")
    p.set_defaults(func=_info)

    p = actions.add_parser(
        "check", help="check an image's metadata for leaks and corruptions",
        formatter_class=_RAW,
        description="Recount every cluster reference and compare with the stored refcounts, "
        "like `qemu-img check`. Exit status: 0 clean, 1 check could not complete, 2 corruptions, 3 leaks only.",
        epilog="examples:\n  vmctl image check vm1.qcow2\n  vmctl image check --repair vm1.qcow2"
        "\n  vmctl image check --repair-all --json vm1.qcow2",
    )
    p.add_argument("file")
    p.add_argument("--repair", action="store_const", const="leaks",
                   help="free leaked clusters (refcount above the references)")
    p.add_argument("--repair-all", dest="repair", action="store_const", const="all",
                   help="also raise refcounts that are too low (after a crash of a writer "
                   "with lazy refcounts)")
    p.add_argument("--json", action="store_true", help="print JSON (qemu-img's keys)")
    p.set_defaults(func=_check)

    p = actions.add_parser(
        "commit", help="write an overlay's changes into its backing file",
        formatter_class=_RAW,
        description="Copy every cluster the overlay holds into its backing file, then empty "
        "the overlay (unless --keep). Nothing else may use the backing file meanwhile.",
        epilog="example:\n  vmctl image commit vm1.qcow2",
    )
    p.add_argument("overlay")
    p.add_argument("--keep", action="store_true", help="leave the overlay's data in place")
    p.set_defaults(func=_commit)

    p = actions.add_parser(
        "rebase", help="change an overlay's backing file",
        formatter_class=_RAW,
        description="Point an overlay at another backing file. By default clusters that differ "
        "between the old and new backing are first copied into the overlay, so the guest "
        "sees the same disk; --unsafe only rewrites the header (for moved or renamed bases).",
        epilog="examples:\n  vmctl image rebase -b new-base.qcow2 vm1.qcow2\n"
        "  vmctl image rebase --unsafe -b /moved/base.qcow2 vm1.qcow2\n"
        "  vmctl image rebase --no-backing vm1.qcow2",
    )
    p.add_argument("overlay")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("-b", "--backing", help="the new backing file")
    target.add_argument("--no-backing", action="store_true",
                        help="make the overlay standalone")
    p.add_argument("-u", "--unsafe", action="store_true", help="only rewrite the header")
    p.add_argument("--absolute", action="store_true", help="store an absolute backing path")
    p.set_defaults(func=_rebase)

    p = actions.add_parser(
        "convert", help="convert between raw and qcow2 (flattening any backing chain)",
        formatter_class=_RAW,
        description="Write the guest-visible content of SOURCE into a new standalone TARGET; "
        "all-zero clusters stay unallocated (qcow2) or sparse (raw).",
        epilog="examples:\n  vmctl image convert rootfs.img rootfs.qcow2\n"
        "  vmctl image convert -O raw vm1.qcow2 vm1.img",
    )
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("-O", "--output-format", choices=("qcow2", "raw"), default="qcow2")
    _add_layout_options(p)
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=_convert)

    p = actions.add_parser(
        "map", help="show which guest ranges are allocated in which image of the chain",
        formatter_class=_RAW,
        description="List guest ranges with the chain depth that provides them (0 = this "
        "image), whether they read as data or zeros, and the host offset (qemu-img map).",
        epilog="examples:\n  vmctl image map vm1.qcow2\n  vmctl image map --json vm1.qcow2",
    )
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print JSON (qemu-img's keys)")
    p.set_defaults(func=_map)


def _add_layout_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster-size", default="64K", help="qcow2 cluster size (512 to 2M)")
    p.add_argument("--compat", choices=("1.1", "0.10"), default="1.1",
                   help="qcow2 version: 1.1 (v3, zero clusters) or 0.10 (v2, old QEMU)")
    p.add_argument("--refcount-bits", type=int, default=16, help="refcount width (1..64)")


def _options(args: argparse.Namespace) -> CreateOptions:
    options = CreateOptions(parse_size(args.cluster_size, "--cluster-size"),
                            3 if args.compat == "1.1" else 2, args.refcount_bits)
    options.validate()
    return options


def _refuse_existing(path: str, force: bool) -> None:
    if os.path.exists(path) and not force:
        raise VmctlError(f"{path}: already exists (use --force to replace it)")


def _create(args: argparse.Namespace) -> int:
    _refuse_existing(args.file, args.force)
    options = _options(args)
    if args.source:
        if args.size:
            raise VmctlError("give either a size or --from, not both")
        ops.convert(args.source, args.file, args.format, options)
    else:
        if not args.size:
            raise VmctlError("a size is needed (or --from IMAGE)")
        size = parse_size(args.size)
        if args.format == "raw":
            _create_raw(args.file, size)
        else:
            create(args.file, size, options)
    print(f"created {args.file} ({format_size(ops.info(args.file)['virtual-size'])})")
    return 0


def _create_raw(path: str, size: int) -> None:
    temp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temp, "xb") as file:
            file.truncate(size)
        os.replace(temp, path)
    except OSError as error:
        if os.path.exists(temp):
            os.unlink(temp)
        raise VmctlError(f"{path}: cannot create: {error.strerror}") from None


def _overlay(args: argparse.Namespace) -> int:
    _refuse_existing(args.overlay, args.force)
    create_overlay(args.base, args.overlay, absolute=args.absolute, options=_options(args))
    print(f"created {args.overlay} backed by {ops.info(args.overlay)['backing-filename']}")
    return 0


def _info(args: argparse.Namespace) -> int:
    data = ops.info(args.file)
    if args.json:
        print(json.dumps(data, indent=4))
        return 0
    print(f"image: {data['filename']}")
    print(f"file format: {data['format']}")
    print(f"virtual size: {format_size(data['virtual-size'])} ({data['virtual-size']} bytes)")
    print(f"disk size: {format_size(data['actual-size'])}")
    if "cluster-size" in data:
        print(f"cluster_size: {data['cluster-size']}")
    if "backing-filename" in data:
        print(f"backing file: {data['backing-filename']}")
        if "backing-filename-format" in data:
            print(f"backing file format: {data['backing-filename-format']}")
    if "format-specific" in data:
        print("Format specific information:")
        for key, value in data["format-specific"]["data"].items():
            print(f"    {key.replace('-', ' ')}: {str(value).lower()}")
    if data.get("dirty-flag"):
        print("dirty flag: true (a writer crashed with lazy refcounts; opening read-write "
              "repairs it)")
    return 0


def _check(args: argparse.Namespace) -> int:
    """Exit status as qemu-img check: 1 check not completed, 2 corruptions, 3 leaks only."""
    try:
        report = check_mod.check(args.file, repair=args.repair)
    except VmctlError as error:
        print(f"vmctl: {error}", file=sys.stderr)
        return 1
    except (ValueError, OverflowError, MemoryError, OSError) as error:  # never a traceback
        print(f"vmctl: {args.file}: check could not complete: {error!r}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.as_dict(), indent=4))
    else:
        print("\n".join(report.summary()))
    if report.check_errors:
        return 1
    if report.corruptions:
        return 2
    return 3 if report.leaks else 0


def _commit(args: argparse.Namespace) -> int:
    count = ops.commit(args.overlay, keep=args.keep)
    print(f"committed {format_size(count)} from {args.overlay} into its backing file")
    return 0


def _rebase(args: argparse.Namespace) -> int:
    new = None if args.no_backing else args.backing
    copied = ops.rebase(args.overlay, new, unsafe=args.unsafe, absolute=args.absolute)
    target = "no backing file" if new is None else new
    print(f"rebased {args.overlay} onto {target} ({format_size(copied)} copied)")
    return 0


def _convert(args: argparse.Namespace) -> int:
    _refuse_existing(args.target, args.force)
    ops.convert(args.source, args.target, args.output_format, _options(args))
    print(f"converted {args.source} to {args.target} ({args.output_format})")
    return 0


def _map(args: argparse.Namespace) -> int:
    extents = ops.map_image(args.file)
    if args.json:
        print(json.dumps(extents, indent=1))
        return 0
    print(f"{'Offset':<16}{'Length':<16}{'Depth':<7}{'Mapped to':<16}Kind")
    for e in extents:
        kind = "data" if e["data"] else ("zero" if e["present"] else "unallocated (zero)")
        where = f"{e['offset']:#x}" if "offset" in e else "-"
        print(f"{e['start']:<#16x}{e['length']:<#16x}{e['depth']:<7}{where:<16}{kind}")
    return 0
