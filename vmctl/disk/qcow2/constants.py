"""qcow2 on-disk constants (QEMU docs/interop/qcow2.txt). All integers are big-endian."""

from __future__ import annotations

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104  # minimum; QEMU writes 112 (compression type byte + padding)
QEMU_V3_HEADER_LENGTH = 112

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
DEFAULT_CLUSTER_BITS = 16
MAX_REFCOUNT_ORDER = 6
DEFAULT_REFCOUNT_ORDER = 4  # 16-bit refcounts, the only width v2 allows

# Limits QEMU enforces; beyond them an image is hostile, not big.
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023
MAX_BACKING_DEPTH = 32
MAX_VIRTUAL_SIZE = 1 << 62

# Header field byte offsets, for error messages.
FIELD_OFFSETS = {
    "magic": 0, "version": 4, "backing_file_offset": 8, "backing_file_size": 16,
    "cluster_bits": 20, "size": 24, "crypt_method": 32, "l1_size": 36,
    "l1_table_offset": 40, "refcount_table_offset": 48, "refcount_table_clusters": 56,
    "nb_snapshots": 60, "snapshots_offset": 64, "incompatible_features": 72,
    "compatible_features": 80, "autoclear_features": 88, "refcount_order": 96,
    "header_length": 100, "compression_type": 104,
}

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

FEATURE_NAMES = (  # (type, bit, name) as QEMU writes them in the feature name table
    (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
    (0, 3, "compression type"), (0, 4, "extended L2 entries"), (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"), (2, 1, "raw external data"),
)

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# L1/L2 entry bits.
OFLAG_COPIED = 1 << 63  # refcount is exactly 1: may be written in place
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0  # v3: cluster reads as zeros
OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55
L1_RESERVED = 0x7F000000000001FF
L2_RESERVED = 0x3F000000000001FE
REFTABLE_RESERVED = 0x1FF

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
