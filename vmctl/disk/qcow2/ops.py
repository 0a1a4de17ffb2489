"""Image operations: info, map, commit, rebase, convert (the `vmctl image` verbs)."""

from __future__ import annotations

import errno
import os
from typing import Any, Iterator

from ..block_backend import BlockBackend, DiskError, open_disk, probe_format
from ..raw import RawDisk
from . import constants as C
from .create import CreateOptions, _unlink_quietly, create, describe_base
from .image import COMPRESSED, DATA, UNALLOCATED, ZERO, Qcow2Image

CHUNK = 2 << 20  # bytes per copy step: big enough for throughput, small for memory


# info

def info(path: str) -> dict[str, Any]:
    """What `qemu-img info --output=json` reports, for raw or qcow2 (no lock: inspection)."""
    fmt = probe_format(path)
    try:
        stat = os.stat(path)
    except OSError as error:
        raise DiskError(f"{path}: cannot stat: {error.strerror}") from None
    out: dict[str, Any] = {"filename": path, "format": fmt, "actual-size": stat.st_blocks * 512}
    if fmt == "raw":
        out["virtual-size"] = stat.st_size
        return out
    image = Qcow2Image(path, read_only=True, lock=False, open_backing=False)
    try:
        h = image.header
        out.update({
            "virtual-size": h.size,
            "cluster-size": h.cluster_size,
            "dirty-flag": bool(h.incompatible_features & C.INCOMPAT_DIRTY),
        })
        if h.backing_file:
            out["backing-filename"] = h.backing_file
            full = h.backing_file if os.path.isabs(h.backing_file) else os.path.join(
                os.path.dirname(path), h.backing_file)
            out["full-backing-filename"] = full
            if h.backing_format:
                out["backing-filename-format"] = h.backing_format
        data = {
            "compat": "1.1" if h.version == 3 else "0.10",
            "refcount-bits": h.refcount_bits,
        }
        if h.version == 3:
            data.update({
                "compression-type": "zlib",
                "lazy-refcounts": bool(h.compatible_features & C.COMPAT_LAZY_REFCOUNTS),
                "corrupt": bool(h.incompatible_features & C.INCOMPAT_CORRUPT),
                "extended-l2": False,
            })
        out["format-specific"] = {"type": "qcow2", "data": data}
        if h.nb_snapshots:
            from .snapshots import read_table
            out["snapshots"] = [snapshot.as_dict() for snapshot in read_table(image)[0]]
    finally:
        image.close()
    return out


# map

def map_image(path: str) -> list[dict[str, Any]]:
    """Allocation of every guest range through the chain, merged like `qemu-img map`:
    depth (0 = this image), present, zero, data and the host offset in that layer's file."""
    disk = open_disk(path, read_only=True, lock=False)
    try:
        merged: list[dict[str, Any]] = []
        for extent in _layer(disk, 0, disk.size, 0):
            _merge(merged, extent)
        return merged
    finally:
        disk.close()


def _merge(merged: list[dict[str, Any]], extent: dict[str, Any]) -> None:
    if merged:
        last = merged[-1]
        same = all(last[k] == extent[k] for k in ("depth", "present", "zero", "data"))
        contiguous = ("offset" not in last and "offset" not in extent) or (
            "offset" in last and "offset" in extent
            and last["offset"] + last["length"] == extent["offset"])
        if same and contiguous and last["start"] + last["length"] == extent["start"]:
            last["length"] += extent["length"]
            return
    merged.append(extent)


def _extent(start: int, length: int, depth: int, present: bool, zero: bool, data: bool,
            offset: int | None = None) -> dict[str, Any]:
    out = {"start": start, "length": length, "depth": depth, "present": present,
           "zero": zero, "data": data}
    if offset is not None:
        out["offset"] = offset
    return out


def _layer(disk: BlockBackend, start: int, end: int, depth: int) -> Iterator[dict[str, Any]]:
    if isinstance(disk, RawDisk):
        yield from _raw_layer(disk, start, end, depth)
        return
    assert isinstance(disk, Qcow2Image)
    pos = start
    while pos < end:
        kind, host, count = disk._extent(pos, end)
        if kind == DATA:
            yield _extent(pos, count, depth, True, False, True, host)
        elif kind == COMPRESSED:
            yield _extent(pos, count, depth, True, False, True)
        elif kind == ZERO:
            yield _extent(pos, count, depth, True, True, False)
        else:
            backing = disk.backing
            inside = 0 if backing is None else max(0, min(count, backing.size - pos))
            if inside and backing is not None:
                yield from _layer(backing, pos, pos + inside, depth + 1)
            if inside < count:
                yield _extent(pos + inside, count - inside, depth, False, True, False)
        pos += count


def _raw_layer(disk: RawDisk, start: int, end: int, depth: int) -> Iterator[dict[str, Any]]:
    """Holes of a sparse raw file read as zeros (SEEK_DATA/SEEK_HOLE)."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(disk.fd, pos, os.SEEK_DATA)
        except OSError as error:
            if error.errno != errno.ENXIO:
                raise
            data = end
        data = min(data, end)
        if data > pos:
            yield _extent(pos, data - pos, depth, True, True, False, pos)
            pos = data
            continue
        try:
            hole = min(os.lseek(disk.fd, pos, os.SEEK_HOLE), end)
        except OSError:
            hole = end
        yield _extent(pos, hole - pos, depth, True, False, True, pos)
        pos = hole


# commit

def commit(path: str, *, keep: bool = False) -> int:
    """Write every cluster the overlay holds into its backing file; then empty the overlay
    (unless `keep`). A base smaller than the overlay is grown first, as qemu-img does.
    Returns the number of bytes committed.

    Everything that can be checked is checked before the base changes: both images open
    for writing (locks, validation) and every overlay table entry is read; an error then
    leaves the base untouched."""
    top = Qcow2Image(path, read_only=False, open_backing=False)
    try:
        h = top.header
        if not h.backing_file:
            raise DiskError(f"{path}: has no backing file to commit into")
        base_path = _backing_path(path, h.backing_file)
        extents = []
        pos = 0
        while pos < top.size:  # validates every L1/L2 entry before the base is touched
            kind, _, count = top._extent(pos, top.size)
            if kind != UNALLOCATED:
                extents.append((kind, pos, count))
            pos += count
        base = open_disk(base_path, read_only=False, format=h.backing_format or None)
        committed = 0
        try:
            if top.size > base.size:
                _grow(base, top.size)
            for kind, pos, count in extents:
                if kind == ZERO:
                    base.write_zeroes(pos, count)
                else:
                    _copy(top, base, pos, count)
                committed += count
            base.flush()
        finally:
            base.close()
        options = CreateOptions(h.cluster_size, h.version, h.refcount_bits)
        size, backing, fmt = h.size, h.backing_file, h.backing_format
    finally:
        top.close()
    if not keep:
        create(path, size, options, backing=backing, backing_format=fmt)
    return committed


def _grow(disk: BlockBackend, size: int) -> None:
    if isinstance(disk, Qcow2Image):
        disk.grow(size)
    elif isinstance(disk, RawDisk):
        try:
            os.ftruncate(disk.fd, size)
        except OSError as error:
            raise DiskError(f"{disk.path}: cannot grow to {size} bytes: {error.strerror}") \
                from None
        disk._size = size
    else:
        raise DiskError(f"{disk.path}: cannot grow this kind of disk")


def _copy(source: BlockBackend, target: BlockBackend, pos: int, count: int) -> None:
    buffer = memoryview(bytearray(min(count, CHUNK)))
    end = pos + count
    while pos < end:
        n = min(CHUNK, end - pos)
        source.readinto(pos, [buffer[:n]])
        target.write(pos, [buffer[:n]])
        pos += n


def _backing_path(image_path: str, name: str) -> str:
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), name)


# rebase

def rebase(path: str, new_backing: str | None, *, unsafe: bool = False,
           absolute: bool = False) -> int:
    """Point an overlay at a new backing file (None: no backing, i.e. flatten its view).

    Safe mode first copies into the overlay every unallocated cluster whose content
    differs between the old and the new backing, so the guest sees the same disk.
    Returns the number of bytes copied.
    """
    if new_backing is not None:
        # As qemu-img: a relative name is relative to the overlay's directory, not to the
        # current one, and is stored as given. An absolute one is stored relative to the
        # overlay (so the pair can move together) unless `absolute`.
        target = _backing_path(path, new_backing)
        base = describe_base(target)
        if absolute:
            name = os.path.abspath(target)
        elif os.path.isabs(new_backing):
            name = os.path.relpath(target, os.path.dirname(os.path.abspath(path)))
        else:
            name = new_backing
        new_backing = target
        fmt: str | None = base.format
    else:
        name, fmt = None, None
    image = Qcow2Image(path, read_only=False, open_backing=not unsafe)
    copied = 0
    try:
        if not unsafe:
            new = open_disk(new_backing, read_only=True) if new_backing else None
            try:
                copied = _copy_differences(image, new)
            finally:
                if new is not None:
                    new.close()
        image.flush_metadata()
        image.header.backing_file = name
        image.header.backing_format = fmt
        image.write_header()
        image.sync()
    finally:
        image.close()
    return copied


def _copy_differences(image: Qcow2Image, new: BlockBackend | None) -> int:
    cs = image.cluster_size
    old_view = memoryview(bytearray(cs))
    new_view = memoryview(bytearray(cs))
    copied = 0
    pos = 0
    while pos < image.size:
        kind, _, count = image._extent(pos, image.size)
        if kind == UNALLOCATED:
            for start in range(pos, pos + count, cs):
                n = min(cs, pos + count - start)
                image._read(start, n, [old_view[:n]])  # through the old backing chain
                inside = 0 if new is None else max(0, min(n, new.size - start))
                if inside and new is not None:
                    new.readinto(start, [new_view[:inside]])
                new_view[inside:n] = bytes(n - inside)
                if old_view[:n] != new_view[:n]:
                    image.write(start, [old_view[:n]])
                    copied += n
        pos += count
    return copied


# convert

def convert(source: str, target: str, out_format: str = "qcow2",
            options: CreateOptions = CreateOptions()) -> None:
    """Copy the guest-visible content of `source` (any chain) into a new standalone image,
    skipping all-zero clusters so the result is sparse. The target appears only when done."""
    if out_format not in ("qcow2", "raw"):
        raise DiskError(f"output format {out_format!r} must be qcow2 or raw")
    if os.path.abspath(source) == os.path.abspath(target):
        raise DiskError(f"{target}: convert cannot write over its own source")
    src = open_disk(source, read_only=True)
    directory = os.path.dirname(os.path.abspath(target))
    temp = os.path.join(directory, f".{os.path.basename(target)}.{os.getpid()}.tmp")
    try:
        if out_format == "raw":
            with open(temp, "xb") as file:
                file.truncate(src.size)
            dst: BlockBackend = RawDisk(temp, read_only=False)
        else:
            create(temp, src.size, options, durable=False)
            dst = Qcow2Image(temp, read_only=False)
        try:
            _copy_nonzero(src, dst, options.cluster_size)
            dst.flush()
        finally:
            dst.close()
        os.replace(temp, target)
    except BaseException:
        _unlink_quietly(temp)
        raise
    finally:
        src.close()


def _copy_nonzero(src: BlockBackend, dst: BlockBackend, granule: int) -> None:
    buffer = memoryview(bytearray(CHUNK))
    zeros = bytes(granule)
    pos = 0
    while pos < src.size:
        n = min(CHUNK, src.size - pos)
        src.readinto(pos, [buffer[:n]])
        run_start = None
        for at in range(0, n + granule, granule):
            nonzero = at < n and buffer[at:min(at + granule, n)] != zeros[:min(granule, n - at)]
            if nonzero and run_start is None:
                run_start = at
            elif not nonzero and run_start is not None:
                dst.write(pos + run_start, [buffer[run_start:min(at, n)]])
                run_start = None
        pos += n
