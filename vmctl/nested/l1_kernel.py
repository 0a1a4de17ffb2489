"""The L1 kernel: Debian's standard amd64 kernel and the few modules the nested host needs.

Taken from the Debian package without installing it (`apt-get download` + `dpkg-deb -x`)
and cached under `vmctl.paths.cache_dir()/nested/kernel/<release>/`. The standard kernel,
not the cloud one: the cloud kernel has no 9p, and 9p is how L1 sees the host's files.
A cached kernel is reused as is (delete the folder to fetch the current one); when there
is none, $VMCTL_NESTED_KERNEL_DEB may name a .deb to use instead of asking apt.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import VmctlError
from ..paths import cache_dir
from . import modinfo

META_PACKAGE = "linux-image-amd64"
# virtio_pci: the 9p devices; 9pnet_virtio + 9p: host files; overlay: a writable view of
# the read-only host root; kvm_amd: /dev/kvm on the emulated AMD-V; tun: TAP devices for
# the guests' virtio-net (`vmctl boot --net`, tests/linux/inner/test_guest_virtio.py);
# vhost_net: /dev/vhost-net, the in-kernel virtio-net data path (vmctl/virtio/vhost.py);
# nf_tables, nft_compat, nft_chain_nat, nft_masq, xt_MASQUERADE, xt_comment: the NAT rule of
# `network: nat` through the host's iptables (iptables-nft on Debian; vmctl/net/host.py);
# crc32c_generic: libcrc32c's soft dependency (without it libcrc32c, so nf_conntrack, fails);
# veth: the container backend's network (vmctl/backends/container/network.py); loop + ext4: an ext4
# work dir that takes O_DIRECT on L1's tmpfs (fio in `vmctl compare --suite disk`, vmctl/suite/scratchfs.py).
NEEDED_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay", "kvm_amd", "tun", "vhost_net",
                  "crc32c_generic", "nf_tables", "nft_compat", "nft_chain_nat", "nft_masq", "xt_MASQUERADE", "xt_comment",
                  "veth", "loop", "ext4"]
DEB_ENV = "VMCTL_NESTED_KERNEL_DEB"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class L1Kernel:
    """A cached kernel: vmlinuz plus modules/<name>.ko and the order to load them in."""

    folder: Path

    @property
    def release(self) -> str:
        return self.folder.name.split("+", 1)[0]  # the folder is <release>+<modules key>

    @property
    def vmlinuz(self) -> Path:
        return self.folder / "vmlinuz"

    @property
    def boot_image(self) -> Path:
        """The uncompressed vmlinux when we could extract it (boots ~3 s faster), else vmlinuz."""
        vmlinux = self.folder / "vmlinux"
        return vmlinux if vmlinux.exists() else self.vmlinuz

    @property
    def modules(self) -> Path:
        return self.folder / "modules"

    def load_order(self) -> list[str]:
        return (self.folder / "load-order").read_text().split()


def kernels_folder() -> Path:
    return cache_dir() / "nested" / "kernel"


def modules_key() -> str:
    """Short hash of NEEDED_MODULES: part of the cache folder's name, so branches with other
    module lists keep their own kernels instead of replacing each other's."""
    return hashlib.sha256(" ".join(NEEDED_MODULES).encode()).hexdigest()[:8]


def _complete(folder: Path) -> bool:
    """Every file in place, made for exactly this NEEDED_MODULES (the `needed` file)."""
    order, needed = folder / "load-order", folder / "needed"
    return order.is_file() and needed.is_file() and needed.read_text().split() == NEEDED_MODULES


def cached_kernel() -> L1Kernel | None:
    """The newest complete kernel in the cache, if any."""
    folder = kernels_folder()
    if not folder.is_dir():
        return None
    complete = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and _complete(p))
    return L1Kernel(complete[-1]) if complete else None


def current_package() -> str:
    """The versioned package the meta package points at now, e.g. linux-image-6.1.0-56-amd64."""
    if not shutil.which("apt-cache"):
        raise VmctlError("apt-cache not found: the nested host takes its kernel from Debian packages")
    result = subprocess.run(
        ["apt-cache", "depends", META_PACKAGE], capture_output=True, text=True, check=False
    )
    found = re.search(r"Depends: (linux-image-\S+-amd64)\b", result.stdout)
    if result.returncode != 0 or not found:
        raise VmctlError(f"apt-cache does not know {META_PACKAGE}: run `apt-get update` first")
    return found.group(1)


def obtain_problem() -> str | None:
    """Why no L1 kernel can be had here, or None when one is cached or can be fetched."""
    if cached_kernel() or os.environ.get(DEB_ENV):
        return None
    for tool in ("apt-get", "dpkg-deb"):
        if not shutil.which(tool):
            return f"{tool} not found and no L1 kernel cached in {kernels_folder()}"
    try:
        current_package()
    except VmctlError as error:
        return str(error)
    return None


def ensure_kernel(progress: Progress) -> L1Kernel:
    """The cached kernel, fetching and unpacking it first when there is none."""
    found = cached_kernel()
    if found:
        return found
    deb = os.environ.get(DEB_ENV)
    folder = kernels_folder()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch-", dir=folder) as scratch:
        work = Path(scratch)
        if deb:
            package_file = Path(deb)
            if not package_file.is_file():
                raise VmctlError(f"${DEB_ENV}={deb} is not a file")
        else:
            package = current_package()
            progress(f"fetching kernel {package} (apt-get download)…")
            _run(["apt-get", "download", package], cwd=work)
            package_file = next(work.glob("*.deb"))
        progress(f"unpacking {package_file.name}…")
        tree = work / "tree"
        _run(["dpkg-deb", "-x", str(package_file), str(tree)])
        return _install(tree, folder)


def _install(tree: Path, folder: Path) -> L1Kernel:
    """Copy vmlinuz and the needed modules out of an unpacked package into the cache."""
    images = sorted((tree / "boot").glob("vmlinuz-*"))
    if not images:
        raise VmctlError("the kernel package has no boot/vmlinuz-*")
    release = images[-1].name.removeprefix("vmlinuz-")
    index = {modinfo.module_name(p): p for p in (tree / "lib/modules" / release).rglob("*.ko")}
    order = modinfo.load_order(NEEDED_MODULES, index)
    staging = folder / f".{release}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "modules").mkdir(parents=True)
    shutil.copyfile(images[-1], staging / "vmlinuz")
    vmlinux = extract_vmlinux(images[-1].read_bytes())
    if vmlinux:
        (staging / "vmlinux").write_bytes(vmlinux)
    for name in order:
        shutil.copyfile(index[name], staging / "modules" / f"{name}.ko")
    (staging / "load-order").write_text("\n".join(order) + "\n")
    (staging / "needed").write_text("\n".join(NEEDED_MODULES) + "\n")
    final = folder / f"{release}+{modules_key()}"
    if final.exists() and not _complete(final):
        shutil.rmtree(final)  # a partial copy from an older vmctl
    # Complete or absent: a cached kernel only appears once every file is in place. A
    # concurrent fetch may have won the race: then keep its copy.
    try:
        staging.rename(final)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not _complete(final):
            raise VmctlError(f"cannot install the L1 kernel into {final}") from None
    return L1Kernel(final)


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF vmlinux inside an xz-compressed bzImage, or None for other compressions.

    Why: under TCG, the bzImage's own xz decompressor takes ~3 s of every boot; QEMU boots
    the ELF directly through its PVH entry point (CONFIG_PVH) with none of that.
    """
    setup_sectors = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sectors + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    if not payload.startswith(b"\xfd7zXZ\x00"):
        return None
    try:
        elf = lzma.LZMADecompressor().decompress(payload)
    except lzma.LZMAError:
        return None
    return elf if elf.startswith(b"\x7fELF") else None


def _run(command: list[str], cwd: Path | None = None) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise VmctlError(f"{command[0]} {command[1]} failed: {last}")
