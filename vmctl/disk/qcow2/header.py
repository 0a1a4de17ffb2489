"""The qcow2 header and its extensions: parse with full validation, and encode."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ..block_backend import DiskFormatError, UnsupportedFeatureError
from . import constants as C

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3 = struct.Struct(">QQQII")  # bytes 72..104
_EXT = struct.Struct(">II")
_FEATURE = struct.Struct(">BB46s")


@dataclass
class Extension:
    type: int
    data: bytes


@dataclass
class Header:
    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = C.DEFAULT_REFCOUNT_ORDER
    header_length: int = C.QEMU_V3_HEADER_LENGTH
    compression_type: int = C.COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    # Extensions vmctl does not interpret (bitmaps, ...) are kept and written back verbatim.
    other_extensions: list[Extension] = field(default_factory=list)
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // 8

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def has_bitmaps(self) -> bool:
        return bool(self.autoclear_features & C.AUTOCLEAR_BITMAPS) and any(
            ext.type == C.EXT_BITMAPS for ext in self.other_extensions
        )

    def encode(self, path: str = "<new image>") -> bytes:
        """Header, extensions, end marker and backing name: the used part of cluster 0."""
        v2 = self.version == 2
        out = bytearray()
        out += _V2.pack(C.MAGIC, self.version, 0, 0, self.cluster_bits, self.size, 0,
                        self.l1_size, self.l1_table_offset, self.refcount_table_offset,
                        self.refcount_table_clusters, self.nb_snapshots, self.snapshots_offset)
        if not v2:
            out += _V3.pack(self.incompatible_features, self.compatible_features,
                            self.autoclear_features, self.refcount_order, self.header_length)
            if self.header_length > C.V3_HEADER_LENGTH:  # QEMU 1.1-5.0 wrote 104: no byte
                out += bytes([self.compression_type])
            out += bytes(self.header_length - len(out))
        extensions: list[Extension] = []
        if self.backing_file and self.backing_format:
            extensions.append(Extension(C.EXT_BACKING_FORMAT, self.backing_format.encode()))
        if not v2 and self.cluster_size >= 8192:  # QEMU leaves it out of small clusters
            table = b"".join(_FEATURE.pack(kind, bit, name.encode())
                             for kind, bit, name in C.FEATURE_NAMES)
            extensions.append(Extension(C.EXT_FEATURE_NAMES, table))
        extensions += self.other_extensions
        for ext in extensions:
            out += _EXT.pack(ext.type, len(ext.data)) + ext.data
            out += bytes(-len(ext.data) % 8)
        out += bytes(8)  # end-of-extensions marker
        backing = (self.backing_file or "").encode()
        if len(backing) > C.MAX_BACKING_NAME:
            raise DiskFormatError(path, "backing_file_size", 16,
                                  f"backing file name is {len(backing)} bytes (max 1023)")
        if backing:
            struct.pack_into(">QI", out, 8, len(out), len(backing))
            out += backing
        if len(out) > self.cluster_size:
            raise DiskFormatError(path, "header", 0, f"header needs {len(out)} bytes, more "
                                  f"than one {self.cluster_size}-byte cluster")
        return bytes(out)


def read(fd: int, path: str, file_size: int) -> Header:
    """Read cluster 0 of an open image (its size is in the header) and parse it."""
    first = os.pread(fd, 4096, 0)
    cluster_bits = int.from_bytes(first[20:24], "big") if len(first) >= 24 else 0
    if first[:4] == C.MAGIC and C.MIN_CLUSTER_BITS <= cluster_bits <= C.MAX_CLUSTER_BITS:
        if (1 << cluster_bits) > len(first) and file_size > len(first):
            first = os.pread(fd, 1 << cluster_bits, 0)
        first = first[: 1 << cluster_bits]
    return parse(first, path, file_size)


def parse(data: bytes, path: str, file_size: int) -> Header:
    """Validate everything in cluster 0 that later code relies on; `data` is that cluster."""
    def fail(name: str, problem: str, offset: int | None = None) -> DiskFormatError:
        return DiskFormatError(path, name, C.FIELD_OFFSETS.get(name, 0)
                               if offset is None else offset, problem)

    if len(data) < C.V2_HEADER_LENGTH:
        raise fail("magic", f"file is {len(data)} bytes, too short for a qcow2 header")
    (magic, version, backing_offset, backing_size, cluster_bits, size, crypt, l1_size,
     l1_offset, rt_offset, rt_clusters, nb_snapshots, snapshots_offset) = _V2.unpack_from(data)
    if magic != C.MAGIC:
        raise fail("magic", f"not a qcow2 image (magic {magic!r})")
    if version not in (2, 3):
        raise UnsupportedFeatureError(path, "version", 4, f"qcow2 version {version} "
                                      "is not supported (only 2 and 3)")
    if not C.MIN_CLUSTER_BITS <= cluster_bits <= C.MAX_CLUSTER_BITS:
        raise fail("cluster_bits", f"{cluster_bits} is outside 9..21")
    cluster_size = 1 << cluster_bits
    header = Header(version, cluster_bits, size, l1_size, l1_offset, rt_offset, rt_clusters,
                    nb_snapshots, snapshots_offset, header_length=C.V2_HEADER_LENGTH)
    if version == 3:
        if len(data) < C.V3_HEADER_LENGTH:
            raise fail("header_length", "file too short for a version 3 header")
        (header.incompatible_features, header.compatible_features,
         header.autoclear_features, header.refcount_order,
         header.header_length) = _V3.unpack_from(data, 72)
        if (header.header_length < C.V3_HEADER_LENGTH or header.header_length % 8
                or header.header_length > cluster_size):
            raise fail("header_length", f"{header.header_length} is not a multiple of 8 "
                       f"between 104 and the cluster size {cluster_size}")
        if header.header_length > 104:
            header.compression_type = data[104]
        if header.refcount_order > C.MAX_REFCOUNT_ORDER:
            raise fail("refcount_order", f"{header.refcount_order} is above 6 (64-bit)")
    if backing_offset > cluster_size:  # QEMU: "Invalid backing file offset"
        raise fail("backing_file_offset", f"{backing_offset:#x} is past the header cluster "
                   f"({cluster_size:#x} bytes)")
    _parse_extensions(header, data, path, backing_offset, cluster_size)
    if crypt:
        raise UnsupportedFeatureError(path, "crypt_method", 32,
                                      f"encrypted images (method {crypt}) are not supported")
    _check_features(header, path)
    _check_geometry(header, path, file_size, fail)
    if backing_offset and backing_size:
        if backing_size > C.MAX_BACKING_NAME:
            raise fail("backing_file_size", f"{backing_size} bytes (max 1023)")
        if backing_offset + backing_size > min(cluster_size, len(data)):
            raise fail("backing_file_offset", f"backing name at {backing_offset:#x} "
                       f"(+{backing_size}) is not inside the header cluster")
        raw = bytes(data[backing_offset:backing_offset + backing_size])
        raw = raw.split(b"\0", 1)[0]  # QEMU reads the name as a C string
        try:
            header.backing_file = raw.decode() or None
        except UnicodeDecodeError:
            raise fail("backing_file_offset", "backing file name is not UTF-8") from None
    return header


def _parse_extensions(header: Header, data: bytes, path: str, backing_offset: int,
                      cluster_size: int) -> None:
    offset = header.header_length
    end = min(backing_offset or cluster_size, cluster_size, len(data))
    while offset < end:  # as QEMU: an extension header may start up to the end of the area
        if offset + 8 > len(data):
            raise DiskFormatError(path, "header extension", offset, "extension header runs "
                                  "past the header cluster")
        kind, length = _EXT.unpack_from(data, offset)
        if kind == C.EXT_END:
            return
        if offset + 8 + length > end:
            raise DiskFormatError(path, f"header extension {kind:#010x}", offset,
                                  f"length {length} runs past the end of the header area "
                                  f"({end:#x})")
        body = bytes(data[offset + 8:offset + 8 + length])
        if kind == C.EXT_BACKING_FORMAT:
            header.backing_format = body.decode("ascii", "replace").rstrip("\0")
        elif kind == C.EXT_FEATURE_NAMES:
            for at in range(0, length - length % 48, 48):
                ftype, bit, name = _FEATURE.unpack_from(body, at)
                header.feature_names[(ftype, bit)] = name.rstrip(b"\0").decode("ascii",
                                                                               "replace")
        elif kind in (C.EXT_CRYPTO, C.EXT_DATA_FILE):
            header.other_extensions.append(Extension(kind, body))
        else:
            header.other_extensions.append(Extension(kind, body))
        offset += 8 + length + (-length % 8)


def _check_features(header: Header, path: str) -> None:
    incompat = header.incompatible_features
    unknown = incompat & ~C.INCOMPAT_KNOWN
    if unknown:
        bits = [b for b in range(64) if unknown >> b & 1]
        names = ", ".join(f"bit {b}" + (f" ({header.feature_names[(0, b)]})"
                                        if (0, b) in header.feature_names else "")
                          for b in bits)
        raise UnsupportedFeatureError(path, "incompatible_features", 72,
                                      f"unknown incompatible feature {names}")
    if incompat & C.INCOMPAT_DATA_FILE:
        raise UnsupportedFeatureError(path, "incompatible_features", 72,
                                      "external data files (bit 2) are not supported")
    if incompat & C.INCOMPAT_EXTL2:
        raise UnsupportedFeatureError(path, "incompatible_features", 72,
                                      "extended L2 entries / subclusters (bit 4) are not "
                                      "supported")
    if header.compression_type != C.COMPRESSION_ZLIB:
        if not incompat & C.INCOMPAT_COMPRESSION:
            raise DiskFormatError(path, "compression_type", 104, "non-zlib compression type "
                                  "without incompatible feature bit 3")
        raise UnsupportedFeatureError(path, "compression_type", 104, f"compression type "
                                      f"{header.compression_type} (zstd) is not supported")


def _check_geometry(header: Header, path: str, file_size: int, fail: Callable[..., DiskFormatError]) -> None:
    cs = header.cluster_size
    if header.size > C.MAX_VIRTUAL_SIZE:
        raise fail("size", f"virtual size {header.size} is absurd")
    needed = -(-header.size // (cs * header.l2_entries))
    if header.l1_size < needed:
        raise fail("l1_size", f"{header.l1_size} entries cannot map {header.size} bytes "
                   f"(needs {needed})")
    if header.l1_size * 8 > C.MAX_L1_BYTES:
        raise fail("l1_size", f"{header.l1_size} entries is above QEMU's 32 MiB L1 limit")
    if header.l1_size:
        _check_table(header.l1_table_offset, "l1_table_offset", cs, file_size, fail)
    elif header.l1_table_offset % cs:
        raise fail("l1_table_offset", f"{header.l1_table_offset:#x} is not aligned to the "
                   f"cluster size {cs:#x}")
    if header.refcount_table_clusters == 0:
        raise fail("refcount_table_clusters", "is 0")
    if header.refcount_table_clusters * cs > C.MAX_REFTABLE_BYTES:
        raise fail("refcount_table_clusters", f"{header.refcount_table_clusters} clusters "
                   "is above QEMU's 8 MiB refcount table limit")
    _check_table(header.refcount_table_offset, "refcount_table_offset", cs, file_size, fail)
    if header.nb_snapshots > C.MAX_SNAPSHOTS:
        raise fail("nb_snapshots", f"{header.nb_snapshots} is above 65536")
    if header.nb_snapshots:
        _check_table(header.snapshots_offset, "snapshots_offset", cs, file_size, fail)
    elif header.snapshots_offset % cs:  # QEMU checks the alignment even of an empty table
        raise fail("snapshots_offset", f"{header.snapshots_offset:#x} is not aligned to the "
                   f"cluster size {cs:#x}")
    l1 = (header.l1_table_offset, header.l1_table_offset + header.l1_size * 8)
    rt = (header.refcount_table_offset,
          header.refcount_table_offset + header.refcount_table_clusters * cs)
    for name, (start, end) in (("l1_table_offset", l1), ("refcount_table_offset", rt)):
        if start < cs and end > start:
            raise fail(name, f"table at {start:#x} overlaps the header cluster")
    if header.l1_size and l1[0] < rt[1] and rt[0] < l1[1]:
        raise fail("l1_table_offset", f"L1 table {l1[0]:#x}..{l1[1]:#x} overlaps the refcount "
                   f"table {rt[0]:#x}..{rt[1]:#x}")


def _check_table(offset: int, name: str, cs: int, file_size: int, fail: Callable[..., DiskFormatError]) -> None:
    if offset % cs:
        raise fail(name, f"{offset:#x} is not aligned to the cluster size {cs:#x}")
    if offset >= file_size:
        raise fail(name, f"{offset:#x} is past the end of the file ({file_size:#x} bytes)")
