"""`vmctl image prune`: remove built images that today's inputs no longer name.

Every change of the kernel fragment, of /init or of a host package gives the images a new
cache key, and the old trees stay behind (1.7 GiB per bench rootfs). An old one may still be
in use: a machine's overlay (or a snapshot's) has it as its qcow2 backing file, a stopped
container's record names its tree, or a running process has one of its files open or mapped.
Those are kept, with the reason; the kernel source and build folders are never touched (they
make the next kernel build incremental).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import kernel, rootfs

_RECORD_SUFFIXES = (".json", ".xml", ".yaml")
_RECORD_MAX_BYTES = 1 << 20
_KERNEL_KEEP = {"src", "work"}  # the source tree and the build folder, not keyed images


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    size: int
    kept_because: str | None  # None: stale and unused, removable


def current_dirs(cache: Path) -> set[Path]:
    """The folders today's inputs build into (every profile, with its debootstrapped base)."""
    keep = {kernel.output_dir(cache, kernel.inputs().key)}
    for prof in rootfs.PROFILES.values():
        keep.add(rootfs.output_dir(cache, prof, rootfs.key(prof)))
        keep.add(cache / "rootfs" / f"{prof.name}-base-{rootfs.base_key(prof)}")
    return keep


def stale_dirs(cache: Path) -> list[Path]:
    keep = current_dirs(cache)
    found = [p for p in sorted((cache / "kernel").glob("*")) if p.name not in _KERNEL_KEEP]
    found += sorted((cache / "rootfs").glob("*"))
    return [p for p in found if p.is_dir() and p not in keep]


def scan(cache: Path, state: Path) -> list[CacheEntry]:
    """Each stale folder, its size, and why it must stay (if it must)."""
    candidates = stale_dirs(cache)
    users = _users(state)
    return [CacheEntry(path, _size(path), _user_of(path, users)) for path in candidates]


def remove(entry: CacheEntry) -> None:
    if entry.kept_because is not None:
        raise ValueError(f"{entry.path} is in use: {entry.kept_because}")
    shutil.rmtree(entry.path)


# --- who uses a cache folder --------------------------------------------------------------

def _users(state: Path) -> list[tuple[str, str]]:
    """(path, who) pairs: files the state folder and running processes point at."""
    users: list[tuple[str, str]] = []
    for path in _files(state):
        if path.suffix == ".qcow2" or path.name.endswith(".qcow2.tmp"):
            users += [(backing, f"backing file of {path}") for backing in _backing_chain(path)]
        elif path.suffix in _RECORD_SUFFIXES and path.stat().st_size <= _RECORD_MAX_BYTES:
            users.append((path.read_text(errors="replace"), f"named in {path}"))
    users += _open_by_processes()
    return users


def _user_of(folder: Path, users: list[tuple[str, str]]) -> str | None:
    prefix = f"{folder}/"
    for text, who in users:
        if prefix in text or text == str(folder):
            return who
    return None


def _backing_chain(path: Path) -> list[str]:
    chain: list[str] = []
    current = str(path)
    for _ in range(64):  # a loop in a malformed chain ends here
        name = _backing_name(current)
        if not name:
            break
        current = name if os.path.isabs(name) else os.path.join(os.path.dirname(current), name)
        current = os.path.realpath(current)
        chain.append(current)
    return chain


def _backing_name(path: str) -> str | None:
    from ..disk.block_backend import DiskError
    from ..disk.qcow2 import header

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return header.read(fd, path, os.fstat(fd).st_size).backing_file
    except DiskError:
        return None  # not a qcow2 image (or a damaged one): nothing to follow
    finally:
        os.close(fd)


def _open_by_processes() -> list[tuple[str, str]]:
    users: list[tuple[str, str]] = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps", errors="replace") as maps:
                users.append((maps.read(), f"mapped by process {pid}"))
            for fd in os.listdir(f"/proc/{pid}/fd"):
                users.append((os.readlink(f"/proc/{pid}/fd/{fd}"), f"open in process {pid}"))
            with open(f"/proc/{pid}/mountinfo", errors="replace") as mounts:
                users.append((mounts.read(), f"mounted in process {pid}'s namespace"))
        except OSError:
            continue  # gone, or not ours to read
    return users


def _files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [Path(d) / name for d, _, names in os.walk(root) for name in names
            if os.path.isfile(os.path.join(d, name))]


def _size(folder: Path) -> int:
    total = 0
    for d, _, names in os.walk(folder):
        for name in names:
            try:
                total += os.lstat(os.path.join(d, name)).st_blocks * 512
            except OSError:
                pass
    return total
