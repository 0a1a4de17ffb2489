"""`vmctl image import|ls|rm|export`: OCI images in the store (docs/images.md, "OCI images")."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..units import human_size

_RAW = argparse.RawDescriptionHelpFormatter


def register(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "import", help="import an OCI layout, OCI archive or docker-save tarball",
        formatter_class=_RAW,
        description="Import a container image (linux/amd64) into the store: every blob's digest is "
        "verified, each layer is unpacked once (shared by every image that has it), and the "
        "image gets a name (default: the file name without .tar). A failed import leaves nothing.",
        epilog="examples:\n  docker save busybox > busybox.tar && vmctl image import busybox.tar\n"
        "  vmctl image import ./layout-dir --name web\n  vmctl run --image oci:busybox -- cat /etc/os-release",
    )
    p.add_argument("source", type=Path, help="OCI layout directory, OCI archive, or docker-save tar")
    p.add_argument("--name", help="image name (default: the source's file name without .tar)")
    p.set_defaults(func=_import)

    p = actions.add_parser("ls", help="list imported images, their layers and shared bytes",
                           description="List the store's images: layers, bytes unpacked, and how many of "
                           "those bytes are layers another image shares.")
    p.add_argument("-l", "--layers", action="store_true", help="list each image's layers too")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_ls)

    p = actions.add_parser("rm", help="remove images (and the blobs and layers nothing else uses)",
                           description="Forget the named images, then delete every blob and unpacked layer "
                           "that no remaining image and no machine uses.")
    p.add_argument("names", nargs="+")
    p.set_defaults(func=_rm)

    p = actions.add_parser("export", help="write an image as a docker-save or OCI archive",
                           formatter_class=_RAW,
                           description="Write an image of the store to FILE: a docker-save archive (what "
                           "`docker load` reads; default) or an OCI archive.",
                           epilog="example:\n  vmctl image export busybox out.tar && docker load -i out.tar")
    p.add_argument("name")
    p.add_argument("file", type=Path)
    p.add_argument("--format", choices=("docker", "oci"), default="docker")
    p.set_defaults(func=_export)


def _store():
    from ..oci.store import ImageStore

    return ImageStore()


def _import(args: argparse.Namespace) -> int:
    store = _store()
    record = store.import_image(args.source, args.name, say=lambda message: print(f"[import] {message}", file=sys.stderr))
    print(f"{record.name}: {len(record.layers)} layers, manifest {record.manifest}", file=sys.stderr)
    print(record.name)
    return 0


def _ls(args: argparse.Namespace) -> int:
    store = _store()
    rows = store.usage()
    if args.json:
        print(json.dumps({"images": rows, "store_bytes": store.store_bytes()}, indent=2))
        return 0
    print(f"{'NAME':28} {'LAYERS':>6} {'BLOBS':>8} {'UNPACKED':>9} {'SHARED':>8}  MANIFEST")
    for row in rows:
        print(f"{row['name']:28} {row['layers']:>6} {human_size(row['blob_bytes']):>8} {human_size(row['unpacked_bytes']):>9} "
              f"{human_size(row['shared_bytes']):>8}  {row['manifest'][:19]}")
        if args.layers:
            for layer in row["layer_list"]:
                print(f"  {layer['diff_id'][:19]}  {human_size(layer['unpacked_bytes']):>8}  used by {layer['images']} image(s)")
    unshared = sum(row["unpacked_bytes"] for row in rows)
    print(f"store: {human_size(store.store_bytes())} on disk (blobs + layers); without sharing the layers "
          f"would take {human_size(unshared)}")
    return 0


def _rm(args: argparse.Namespace) -> int:
    store = _store()
    for name in args.names:
        removed = store.remove(name)
        print(f"{name}: removed ({len(removed)} unused blobs/layers deleted)", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..oci.write import export

    export(_store(), args.name, args.file, args.format)
    print(f"{args.name}: written to {args.file} ({args.format} archive)", file=sys.stderr)
    return 0
