"""Guest images: the reference kernel, the base root filesystem and initramfs, in the cache.

`locate()` says where they are (building nothing); `build_*` make them, each step skipped
when its output is current. See docs/images.md.
"""

from .build import build_all, build_initramfs, build_kernel, build_rootfs
from .initargs import EXIT_PREFIX, READY_MARKER, InitArgs, exit_code
from .layout import ImagePaths, locate

__all__ = ["EXIT_PREFIX", "ImagePaths", "InitArgs", "READY_MARKER", "build_all",
           "build_initramfs", "build_kernel", "build_rootfs", "exit_code", "locate"]
