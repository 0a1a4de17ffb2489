"""Guest images: the reference kernel, the base root filesystem and initramfs, in the cache.

`locate()` says where they are (building nothing); `build_*` make them, each step skipped
when its output is current. See docs/images.md; what the images promise to vmctl (markers,
/init arguments) is `vmctl.guest_contract`.
"""

from .build import build_all, build_initramfs, build_kernel, build_rootfs
from .layout import ImagePaths, locate

__all__ = ["ImagePaths", "build_all", "build_initramfs", "build_kernel", "build_rootfs", "locate"]
