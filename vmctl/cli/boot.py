"""`vmctl boot`: boot a kernel on the native VMM, stream its console, exit with its status."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import VmctlError
from ..guest_contract import DEFAULT_CMDLINE
from ..limits import MAX_CPUS
from ..units import parse_size
from ..virtio import factories
from ..virtio.slot import VirtioMmioFactory
from ..vmm.machine import Machine, MachineConfig, default_console_sinks

EPILOG = f"""\
exit status:
  the guest's own status when it reports one: a write to port 0xf4 (tiny guests) or a
  "VMCTL-EXIT <n>" console line (vmctl's images); 0 when the guest resets or powers off;
  124 when --timeout expires; 125 when the guest crashes (triple fault, KVM internal
  error, kernel panic); 1 for errors before the guest starts.

examples:
  vmctl boot --kernel bzImage --initrd initramfs.cpio --memory 512M --cpus 2
  vmctl boot --kernel vmlinux --cmdline "console=ttyS0 rdinit=/bin/sh" --console-log boot.log
  vmctl boot --kernel guest.elf --timeout 10          # a tiny test guest (ELF)

default command line: {DEFAULT_CMDLINE}
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "boot",
        help="boot a kernel on the native KVM VMM",
        description="Boot an x86-64 Linux kernel (bzImage or ELF vmlinux) on vmctl's own VMM over "
        "/dev/kvm, with a 16550 serial console on COM1. The console streams to stdout; when stdin "
        "is a terminal it is forwarded to the guest (Ctrl-A x quits).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kernel", "-k", required=True, type=Path, help="bzImage or ELF vmlinux")
    parser.add_argument("--initrd", "-i", type=Path, help="initial ramdisk (cpio archive)")
    parser.add_argument("--cmdline", "-c", default=DEFAULT_CMDLINE, help="kernel command line")
    parser.add_argument("--append", "-a", default="", help="text appended to the command line")
    parser.add_argument("--cpus", type=int, default=1, help=f"vCPUs, 1..{MAX_CPUS} (default 1)")
    parser.add_argument("--memory", "-m", default="256M", help="guest RAM, e.g. 512M, 2G (default 256M)")
    parser.add_argument("--memory-backing", choices=("anonymous", "memfd"), default="anonymous",
                        help="anonymous private memory, or a memfd that other processes can map")
    parser.add_argument("--console-log", type=Path, help="also append the console output to FILE")
    parser.add_argument("--quiet", "-q", action="store_true", help="do not copy the console to stdout")
    parser.add_argument("--timeout", type=float, help="stop the guest after SECONDS (exit status 124)")
    parser.add_argument("--no-input", action="store_true", help="never forward stdin to the guest")
    parser.add_argument("--disk", action="append", default=[], metavar="PATH[,ro]",
                        help="virtio-blk disk (raw or qcow2), /dev/vda, /dev/vdb... in order; repeatable")
    parser.add_argument("--fs", action="append", default=[], metavar="HOSTDIR,tag=TAG[,ro][,cache=auto|always|never]",
                        help="virtio-fs share of a host folder; in the guest: mount -t virtiofs TAG DIR; repeatable")
    parser.add_argument("--pmem", action="append", default=[], metavar="FILE",
                        help="virtio-pmem of a file, read-only (/dev/pmemN in the guest, in order; for a raw ext4 "
                        "with 4 KiB blocks: mount -t ext4 -o ro,dax /dev/pmemN DIR); repeatable")
    parser.add_argument("--rng", action="store_true", help="virtio-rng device fed from the host's urandom")
    parser.add_argument("--net", choices=("none", "isolated", "nat"), default="none",
                        help="virtio-net on a new TAP: isolated (guest <-> host only) or nat (plus outbound "
                        "NAT through the host); the guest gets ip= on its command line (default none)")
    parser.add_argument("--console-channel", metavar="SOCKET",
                        help="virtio-console (guest /dev/hvc0) connected to a Unix socket vmctl listens on")
    parser.set_defaults(func=run)


def parse_disk_option(spec: str) -> VirtioMmioFactory:
    """`PATH[,ro]` (also `,rw`, `,serial=ID`) from `--disk`."""
    path, *options = spec.split(",")
    read_only, serial = False, None
    for option in options:
        if option in ("ro", "readonly"):
            read_only = True
        elif option == "rw":
            read_only = False
        elif option.startswith("serial="):
            serial = option[len("serial="):]
        else:
            raise VmctlError(f"--disk {spec}: unknown option {option!r} (ro, rw, serial=ID)")
    if not path:
        raise VmctlError(f"--disk {spec}: no path")
    if not Path(path).is_file():
        raise VmctlError(f"--disk {path}: no such file")
    return factories.block(path, read_only, serial)


def parse_fs_option(spec: str) -> VirtioMmioFactory:
    """`HOSTDIR,tag=TAG[,ro][,cache=MODE]` from `vmctl boot --fs`."""
    from ..fs.cache import MODES

    path, *options = spec.split(",")
    tag, read_only, cache = None, False, "auto"
    for option in options:
        if option in ("ro", "readonly"):
            read_only = True
        elif option == "rw":
            read_only = False
        elif option.startswith("tag="):
            tag = option[len("tag="):]
        elif option.startswith("cache="):
            cache = option[len("cache="):]
            if cache not in MODES:
                raise VmctlError(f"--fs {spec}: cache={cache}: expected one of {', '.join(MODES)}")
        else:
            raise VmctlError(f"--fs {spec}: unknown option {option!r} (tag=TAG, ro, rw, cache=MODE)")
    if not Path(path).is_dir():
        raise VmctlError(f"--fs {path}: not a directory")
    if not tag or len(tag.encode()) > 36:
        raise VmctlError(f"--fs {spec}: give tag=TAG (1..36 bytes), the name the guest mounts")
    return factories.fs(path, tag, read_only, cache)


def virtio_devices(args: argparse.Namespace) -> list[VirtioMmioFactory]:
    """The virtio slots the options ask for: disks first (slot order = vda, vdb...)."""
    devices = [parse_disk_option(spec) for spec in args.disk]
    devices += [parse_fs_option(spec) for spec in args.fs]
    for path in args.pmem:
        if not Path(path).is_file():
            raise VmctlError(f"--pmem {path}: no such file")
        devices.append(factories.pmem(path))
    if args.rng:
        devices.append(factories.rng())
    if args.console_channel:
        devices.append(factories.console(args.console_channel))
    if args.net and args.net != "none":
        devices.append(factories.NetFactory(args.net))
    return devices


def run(args: argparse.Namespace) -> int:
    from ..host_probe import linux_guest_problem

    problem = linux_guest_problem(args.kernel)
    if problem:
        raise VmctlError(f"{args.kernel}: {problem}")
    devices = virtio_devices(args)
    # Kernel parameters the devices need (the guest's `ip=` for a network).
    net_words = [word for device in devices if isinstance(device, factories.NetFactory) for word in device.cmdline_words()]
    cmdline = " ".join(word for word in [args.cmdline, args.append, *net_words] if word).strip()
    config = MachineConfig(
        kernel=args.kernel,
        initrd=args.initrd,
        cmdline=cmdline,
        cpus=args.cpus,
        memory=parse_size(args.memory, "--memory"),
        memory_backing=args.memory_backing,
        console_sinks=default_console_sinks(args.console_log, args.quiet),
        interactive=not args.no_input and sys.stdin.isatty(),
        timeout=args.timeout,
        devices=devices,
    )
    from ..vmm import profiling

    profiled = profiling.install()
    outcome = Machine(config).run()
    if profiled:
        profiling.dump()
    if outcome.crashed or outcome.exit_code == 124:
        print(f"vmctl: error: {outcome.reason}", file=sys.stderr)
    else:
        print(f"vmctl: {outcome.reason}", file=sys.stderr)
    return outcome.exit_code
