"""Where the built images are in the cache (computed from their inputs, nothing built)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import paths
from . import kernel, rootfs

EXT4_NAME = "rootfs.ext4"
QCOW2_NAME = "rootfs.qcow2"
INITRAMFS_NAME = "initramfs.cpio"


@dataclass(frozen=True)
class ImagePaths:
    """The artefacts of one kernel + one rootfs profile. Paths may not exist yet."""

    cache: Path
    profile: str
    kernel_dir: Path
    vmlinux: Path
    bzimage: Path
    kernel_config: Path
    system_map: Path
    rootfs_dir: Path
    rootfs_tree: Path
    rootfs_ext4: Path
    rootfs_qcow2: Path
    initramfs: Path
    kernel_log: Path
    rootfs_log: Path

    def artefacts(self) -> dict[str, Path]:
        """The files a VM boots from, by name (for listings and checks)."""
        return {"vmlinux": self.vmlinux, "bzImage": self.bzimage,
                "kernel_config": self.kernel_config, "initramfs": self.initramfs,
                "rootfs_tree": self.rootfs_tree, "rootfs_ext4": self.rootfs_ext4,
                "rootfs_qcow2": self.rootfs_qcow2}

    def missing(self) -> list[str]:
        return [name for name, path in self.artefacts().items() if not path.exists()]

    def as_dict(self) -> dict[str, str]:
        return {name: str(value) for name, value in self.__dict__.items()}


def locate(profile: str = "busybox", cache: Path | None = None) -> ImagePaths:
    """Paths of the current images for `profile` (keys hashed from today's inputs)."""
    cache = Path(cache) if cache is not None else paths.cache_dir()
    prof = rootfs.profile(profile)
    kkey = kernel.inputs().key
    kdir = kernel.output_dir(cache, kkey)
    rkey = rootfs.key(prof)
    rdir = rootfs.output_dir(cache, prof, rkey)
    return ImagePaths(
        cache=cache, profile=prof.name, kernel_dir=kdir, vmlinux=kdir / "vmlinux",
        bzimage=kdir / "bzImage", kernel_config=kdir / "config",
        system_map=kdir / "System.map", rootfs_dir=rdir, rootfs_tree=rdir / "tree",
        rootfs_ext4=rdir / EXT4_NAME, rootfs_qcow2=rdir / QCOW2_NAME,
        initramfs=rdir / INITRAMFS_NAME, kernel_log=kernel.log_path(cache, kkey),
        rootfs_log=rootfs.log_path(cache, prof, rkey))
