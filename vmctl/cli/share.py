"""`vmctl share mount|umount`: vmctl's folder-sharing file server mounted on the host."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from ..errors import VmctlError


def register(subparsers: argparse._SubParsersAction) -> None:
    share = subparsers.add_parser(
        "share", help="serve a host folder with vmctl's FUSE server (on the host, no VM)",
        description="The file server that backs `mounts:` in guests (virtio-fs), mounted on the "
        "host through /dev/fuse, so it can be used and tested with ordinary tools. Needs root.",
        epilog="examples:\n  vmctl share mount --detach ~/project /mnt/p\n  vmctl share umount /mnt/p",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = share.add_subparsers(dest="share_command", metavar="COMMAND")
    mount = commands.add_parser("mount", help="mount HOSTDIR at MOUNTPOINT (foreground until unmounted)")
    mount.add_argument("source", metavar="HOSTDIR")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT")
    mount.add_argument("--read-only", action="store_true", help="refuse every change (EROFS)")
    mount.add_argument("--cache", choices=("auto", "always", "never"), default="auto",
                       help="what the kernel may cache (default auto: names/attributes 1 s, data until "
                       "the file changes; always: a day; never: nothing), docs/sharing.md")
    mount.add_argument("--detach", "-d", action="store_true",
                       help="return once mounted; the server runs on in the background")
    mount.set_defaults(func=_mount)
    umount = commands.add_parser("umount", help="unmount (the server process then exits)")
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")
    umount.set_defaults(func=_umount)
    share.set_defaults(func=lambda args: share.print_help() or 2)


def _mount(args: argparse.Namespace) -> int:
    from ..fs.hostmount import HostMount, check_share_source, unmount
    from ..fs.server import FileServer

    source = check_share_source(args.source)
    if not os.path.isdir(args.mountpoint):
        raise VmctlError(f"{args.mountpoint}: mount point is not a directory")
    if os.path.realpath(args.mountpoint).startswith(str(source) + os.sep) or os.path.realpath(args.mountpoint) == str(source):
        raise VmctlError(f"{args.mountpoint}: mount point inside the shared folder {source}")
    host = HostMount(FileServer(source, args.read_only, args.cache), args.mountpoint)
    host.mount()  # mounted before we fork: when `--detach` returns, the mount is there
    if args.detach:
        if os.fork():
            os._exit(0)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
    else:
        print(f"vmctl share: {source} mounted at {host.mountpoint} (Ctrl-C or `vmctl share umount` to stop)",
              file=sys.stderr, flush=True)

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=unmount, args=(host.mountpoint,), daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    workers = [threading.Thread(target=host.serve_forever, daemon=True) for _ in range(host.threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        while worker.is_alive():
            worker.join(0.5)
    host.server.close()
    return 0


def _umount(args: argparse.Namespace) -> int:
    from ..fs.hostmount import mounted, unmount

    if not mounted(args.mountpoint):
        raise VmctlError(f"{args.mountpoint}: not mounted")
    unmount(args.mountpoint)
    return 0
