"""qcow2 images in pure Python, compatible with QEMU's format (docs/qcow2.md)."""

from .image import Qcow2Image

__all__ = ["Qcow2Image"]
