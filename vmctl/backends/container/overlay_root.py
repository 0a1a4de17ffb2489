"""A container's root filesystem: the base image tree read-only, plus its own upper layer.

The lower layer is the unpacked tree `vmctl image build` keeps next to the ext4 and qcow2
images of the same profile (vmctl.images.locate(profile).rootfs_tree): same files the VMs
boot from, no loop device to leak. overlayfs never writes to a lower layer, so any number of
containers share it; each one's writes go to <machine>/rootfs/upper (the counterpart of a
VM's qcow2 overlay), deleted with the machine folder.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from pathlib import Path

from ...errors import VmctlError

MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def base_tree(profile: str) -> Path:
    """The unpacked base tree of an image profile; an error that says how to build it.
    `oci:NAME`: the image's unpacked layers as one overlayfs lowerdir value (top first,
    colon-separated), which is what Overlay.lower is used as."""
    from ...images import locate

    if profile.startswith("oci:"):
        from ...oci.runconfig import open_image

        return Path(":".join(str(path) for path in open_image(profile).lowers))

    tree = locate(profile).rootfs_tree
    if not (tree / "bin").is_dir():
        raise VmctlError(f"the {profile} base tree is not built ({tree}): run `vmctl image build"
                         f"{'' if profile == 'busybox' else ' --profile ' + profile}`")
    return tree


@dataclass(frozen=True)
class Overlay:
    lower: Path
    folder: Path  # <machine>/rootfs

    @property
    def upper(self) -> Path:
        return self.folder / "upper"

    @property
    def work(self) -> Path:
        return self.folder / "work"

    @property
    def merged(self) -> Path:
        return self.folder / "merged"

    def mount(self) -> None:
        for path in (self.upper, self.work, self.merged):
            path.mkdir(parents=True, exist_ok=True)
        options = f"lowerdir={self.lower},upperdir={self.upper},workdir={self.work}"
        if _libc.mount(b"overlay", str(self.merged).encode(), b"overlay", 0, options.encode()) != 0:
            error = ctypes.get_errno()
            raise VmctlError(f"cannot mount the overlay root at {self.merged}: {os.strerror(error)} "
                             f"(overlayfs needs a kernel with CONFIG_OVERLAY_FS and an upper dir not on overlayfs)")

    def unmount(self) -> None:
        """Idempotent; a busy mount is detached (it goes when its last user does)."""
        if not is_mounted(self.merged):
            return
        path = str(self.merged).encode()
        if _libc.umount2(path, 0) != 0 and _libc.umount2(path, MNT_DETACH) != 0:
            error = ctypes.get_errno()
            raise VmctlError(f"cannot unmount {self.merged}: {os.strerror(error)}")


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            # field 5 is the mount point, with spaces etc. escaped as \040
            if line.split()[4].encode().decode("unicode_escape") == target:
                return True
    return False
