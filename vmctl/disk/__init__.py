"""Virtual disks for the VMMs: the BlockBackend interface, raw files and qcow2 images."""

from .block_backend import (
                            BlockBackend,
                            DiskError,
                            DiskFormatError,
                            DiskRangeError,
                            ImageCorruptError,
                            ReadOnlyError,
                            UnsupportedFeatureError,
                            open_disk,
                            probe_format,
)
from .image_lock import ImageLockedError

__all__ = [
    "BlockBackend", "DiskError", "DiskFormatError", "DiskRangeError", "ImageCorruptError", "ImageLockedError",
    "ReadOnlyError", "UnsupportedFeatureError", "open_disk", "probe_format",
]
