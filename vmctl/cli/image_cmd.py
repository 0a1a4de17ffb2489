"""`vmctl image ...`: build guest images (kernel, rootfs, initramfs) and manage qcow2 disks."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "image",
        help="build guest images and manage qcow2 disks",
        description="Build the reference guest kernel, root filesystem and initramfs into the "
        "cache, and create, inspect, check and convert qcow2 disks and overlays.",
    )
    actions = parser.add_subparsers(dest="image_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    for module in _action_modules():
        module.register(actions)


def _action_modules() -> list:
    """Each module adds its own actions; a module that is not there yet is simply absent."""
    import importlib

    modules = []
    for name in ("image_build", "image_disk", "image_oci"):
        try:
            modules.append(importlib.import_module(f"{__package__}.{name}"))
        except ModuleNotFoundError as error:
            if error.name != f"{__package__}.{name}":
                raise
    return modules
