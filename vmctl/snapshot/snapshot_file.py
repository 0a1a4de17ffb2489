"""The snapshot directory: a state file (binary header + JSON) and a guest memory file.

    SNAP/state     bytes 0..63   header (little-endian):
                     0  8   magic "VMCTLSNP"
                     8  4   format version (FORMAT_VERSION)
                     12 4   header size (64)
                     16 8   length of the JSON that follows
                     24 32  SHA-256 of that JSON
                     56 8   reserved, zero
                   bytes 64..    JSON: machine shape, vCPUs, irqchip/PIT/clock, devices, disks,
                                 and the memory file's size and checksum
    SNAP/memory    guest RAM, the regions one after the other (JSON `machine.regions` gives
                   guest address, size and file offset); all-zero 64 KiB chunks are holes.
                   Its checksum is SHA-256 over (offset, bytes) of every non-zero chunk, so
                   it does not depend on whether a copy kept the holes.

The state file is written last, to `state.tmp` and renamed: a crash while saving leaves a
directory without `state`, which every reader refuses as incomplete (and `vmctl snapshot
delete` removes). Reading checks, in order: the header, the
format version, the length, the JSON checksum, the JSON, the memory file's size and (unless a
stamp says this very file was checked) its checksum; each failure is one line naming the file.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .. import __version__
from ..errors import VmctlError
from ..kvm.ioctl import libc

MAGIC = b"VMCTLSNP"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQ32s8x")
STATE_FILE = "state"
MEMORY_FILE = "memory"
VERIFIED_STAMP = ".memory-verified"  # (inode, size, mtime) of a memory file whose checksum matched
CHUNK = 64 << 10
_ZERO = bytes(CHUNK)


class SnapshotError(VmctlError):
    """A snapshot that cannot be used; the message names the file and what is wrong."""


@dataclass
class SnapshotFile:
    path: Path
    state: dict[str, Any]

    @property
    def memory_path(self) -> Path:
        return self.path / MEMORY_FILE


# --- writing -------------------------------------------------------------------------------
class MemoryWriter:
    """Writes guest RAM into the memory file chunk by chunk, leaving all-zero chunks as holes."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.offset = 0
        self.digest = hashlib.sha256()
        self._memcmp = libc().memcmp
        self._memcmp.restype = ctypes.c_int
        self._memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
        self._zero = ctypes.create_string_buffer(CHUNK)

    def write_region(self, host_address: int, view: memoryview) -> int:
        """Append one RAM region (its host mapping and a view of it); returns its file offset."""
        start = self.offset
        size = view.nbytes
        for position in range(0, size, CHUNK):
            length = min(CHUNK, size - position)
            if self._memcmp(host_address + position, self._zero, length) == 0:
                continue
            chunk = view[position : position + length]
            written = os.pwrite(self.fd, chunk, start + position)
            if written != length:
                raise OSError(f"short write to the memory file ({written} of {length} bytes)")
            self.digest.update(struct.pack("<Q", start + position))
            self.digest.update(chunk)
        self.offset = start + size
        return start

    def finish(self) -> tuple[int, str]:
        os.ftruncate(self.fd, self.offset)  # the holes at the end
        os.fsync(self.fd)
        os.close(self.fd)
        return self.offset, self.digest.hexdigest()


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """The state file, made visible in one step (rename) once it and the memory file are on
    disk: its presence is what makes the snapshot complete."""
    body = json.dumps(state, separators=(",", ":")).encode()
    header = HEADER.pack(MAGIC, FORMAT_VERSION, HEADER.size, len(body), hashlib.sha256(body).digest())
    temporary = folder / f"{STATE_FILE}.tmp"
    with open(temporary, "wb") as file:
        file.write(header + body)
        file.flush()
        os.fsync(file.fileno())
    os.rename(temporary, folder / STATE_FILE)
    sync_directory(folder)


def sync_directory(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


# --- reading -------------------------------------------------------------------------------
def read_snapshot(path: Path, verify_memory: bool = True) -> SnapshotFile:
    """Open and check a snapshot directory; raises SnapshotError with one line."""
    path = Path(path)
    state_path = path / STATE_FILE
    if not path.is_dir():
        raise SnapshotError(f"{path}: no such snapshot")
    try:
        data = state_path.read_bytes()
    except FileNotFoundError:
        raise SnapshotError(f"{state_path}: missing (not a complete snapshot)") from None
    if len(data) < HEADER.size:
        raise SnapshotError(f"{state_path}: truncated: {len(data)} bytes, the header alone is {HEADER.size}")
    magic, version, header_size, length, digest = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError(f"{state_path}: not a vmctl snapshot (bad magic at byte 0)")
    if version != FORMAT_VERSION:
        raise SnapshotError(f"{state_path}: snapshot format version {version} (byte 8), this vmctl "
                            f"{__version__} reads version {FORMAT_VERSION} only")
    if header_size != HEADER.size:
        raise SnapshotError(f"{state_path}: header size {header_size} at byte 12, expected {HEADER.size}")
    body = data[HEADER.size :]
    if len(body) != length:
        what = "truncated" if len(body) < length else "trailing bytes"
        raise SnapshotError(f"{state_path}: {what}: {len(data)} bytes, the header (byte 16) says "
                            f"{HEADER.size + length}")
    if hashlib.sha256(body).digest() != digest:
        raise SnapshotError(f"{state_path}: checksum mismatch (bytes {HEADER.size}..{len(data)} do not match the "
                            "SHA-256 at byte 24): the file is corrupted")
    try:
        state = json.loads(body)
    except ValueError as error:
        raise SnapshotError(f"{state_path}: bad JSON: {error}") from None
    if not isinstance(state, dict):
        raise SnapshotError(f"{state_path}: the JSON is not an object")
    snapshot = SnapshotFile(path, state)
    check_memory_file(snapshot, verify_memory)
    return snapshot


def check_memory_file(snapshot: SnapshotFile, verify: bool = True) -> None:
    memory = snapshot.state.get("memory_file")
    if not isinstance(memory, dict) or not isinstance(memory.get("size"), int) or not isinstance(memory.get("sha256"), str):
        raise SnapshotError(f"{snapshot.path / STATE_FILE}: memory_file: missing or malformed")
    path = snapshot.memory_path
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SnapshotError(f"{path}: missing") from None
    if info.st_size != memory["size"]:
        what = "truncated" if info.st_size < memory["size"] else "too long"
        raise SnapshotError(f"{path}: {what}: {info.st_size} bytes, the snapshot saved {memory['size']}")
    if not verify:
        return
    stamp = snapshot.path / VERIFIED_STAMP
    identity = f"{info.st_ino} {info.st_size} {info.st_mtime_ns} {memory['sha256']}"
    try:
        if stamp.read_text() == identity:
            return  # this very file was checked already: restoring clones stays fast
    except OSError:
        pass
    if memory_checksum(path) != memory["sha256"]:
        raise SnapshotError(f"{path}: checksum mismatch: the guest memory file is corrupted")
    try:
        stamp.write_text(identity)
    except OSError:
        pass  # a read-only snapshot folder: checked again next time


def memory_checksum(path: Path) -> str:
    """MemoryWriter's checksum, recomputed from the file (reading only its data extents)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as file:
        for start, end in _data_extents(file.fileno()):
            position = start - start % CHUNK
            while position < end:
                chunk = os.pread(file.fileno(), CHUNK, position)
                if chunk != _ZERO[: len(chunk)]:
                    digest.update(struct.pack("<Q", position))
                    digest.update(chunk)
                position += CHUNK
    return digest.hexdigest()


def _data_extents(fd: int) -> Iterator[tuple[int, int]]:
    size = os.fstat(fd).st_size
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError:
            return  # only holes from here on (ENXIO)
        end = os.lseek(fd, start, os.SEEK_HOLE)
        # Extents come in file-system blocks; chunks never straddle two reads twice.
        yield start, end
        position = end + (-end % CHUNK) if end % CHUNK else end
