"""One layer tar -> one directory, in the form overlayfs reads as a lower layer.

Python's tarfile does the extraction, with an extraction filter of our own (`LayerFilter`):
tarfile's stock `data`/`tar` filters are made for data archives and would reject what a root
filesystem legitimately holds (absolute symlinks such as /lib64/ld-linux…, setuid bits,
device nodes under /dev, owners). Our filter keeps those and refuses, naming the entry:

- absolute names and names with `..` (nothing is written outside the layer directory);
- an entry under a path that is a symlink in this layer (a symlink followed by a later
  entry that would write through it);
- hard links to an absolute or `..` name, to a directory, or through a symlink;
- device nodes outside /dev, and raw overlayfs whiteouts (char 0:0) given as entries;
- `trusted.*` extended attributes (overlayfs reads its own markers there);
- an entry declaring more bytes than the store has free (or `max_entry`).

Whiteouts (`.wh.NAME`) become overlayfs whiteouts (a char device 0:0 named NAME) and opaque
markers (`.wh..wh..opq`) the `trusted.overlay.opaque=y` xattr on their directory, so the
directory is an overlayfs lower as is. A whiteout must name a path that exists in the layers
below (`check_whiteouts`). The uncompressed stream is hashed on the way and must equal the
config's diff_id.
"""

from __future__ import annotations

import gzip
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable

from ..errors import VmctlError
from . import digest as dg

WHITEOUT_PREFIX = ".wh."
OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
KEPT_XATTR_PREFIXES = ("user.", "security.capability")
MAX_ENTRY = 64 << 30


class LayerEntryError(tarfile.FilterError):
    def __init__(self, member: str, message: str) -> None:
        super().__init__(message)
        self.member, self.message = member, message


@dataclass
class LayerStats:
    entries: int = 0
    bytes: int = 0
    whiteouts: list[str] = field(default_factory=list)  # paths removed from the layers below
    opaque: list[str] = field(default_factory=list)  # directories whose lower content is hidden
    hardlinks_copied: int = 0  # hard links to a file of a lower layer, copied up


def is_whiteout(path: str | Path) -> bool:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISCHR(info.st_mode) and info.st_rdev == 0


class LayerFilter:
    """The extraction filter: called by tarfile for each member before it is extracted."""

    def __init__(self, dest: Path, lowers: list[Path], budget: int, max_entry: int = MAX_ENTRY) -> None:
        self.dest = os.path.realpath(dest)
        self.lowers = lowers  # unpacked lower layers, top first (for hard links copied up)
        self.budget = budget
        self.max_entry = max_entry
        self.stats = LayerStats()
        self.directories: list[tuple[str, tarfile.TarInfo]] = []

    def __call__(self, member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo | None:
        name = self._name(member)
        if name is None:
            return None  # the layer root itself
        self.stats.entries += 1
        parent, base = posixpath.split(name)
        self._parent_dirs(member, parent)
        target = os.path.join(self.dest, name)
        if base == OPAQUE:
            self._opaque(parent)
            return None
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(member, parent, base[len(WHITEOUT_PREFIX):])
            return None
        self._check_type(member, name)
        if member.size > self.max_entry or member.size > self.budget:
            raise LayerEntryError(member.name, f"declares {member.size} bytes, more than the "
                                  f"{min(self.max_entry, self.budget)} bytes the store can take")
        self.budget -= member.size
        self.stats.bytes += member.size
        replaced_whiteout = is_whiteout(target)
        if os.path.lexists(target) and not (member.isdir() and os.path.isdir(target) and not os.path.islink(target)):
            _remove(target)  # a later entry replaces an earlier one (never written through)
        if member.isdir():
            self.directories.append((target, member))
            if replaced_whiteout:  # deleted then re-created in this layer: hide the old content
                os.makedirs(target, exist_ok=True)
                os.setxattr(target, OPAQUE_XATTR, b"y")
        if member.islnk():
            return self._hardlink(member, name)
        return member

    def _name(self, member: tarfile.TarInfo) -> str | None:
        name = member.name
        if name.startswith("/"):
            raise LayerEntryError(name, "absolute path (layer entries are relative to the root)")
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise LayerEntryError(name, "path leaves the layer root ('..')")
        return "/".join(parts) or None

    def _parent_dirs(self, member: tarfile.TarInfo, parent: str) -> None:
        """Every component of the parent is a real directory of this layer (made if absent)."""
        current = self.dest
        for part in parent.split("/") if parent else []:
            current = os.path.join(current, part)
            try:
                info = os.lstat(current)
            except FileNotFoundError:
                os.mkdir(current, 0o755)
                continue
            if stat.S_ISLNK(info.st_mode):
                raise LayerEntryError(member.name, f"written through the symlink {os.path.relpath(current, self.dest)!r}")
            if not stat.S_ISDIR(info.st_mode):
                raise LayerEntryError(member.name, f"{os.path.relpath(current, self.dest)!r} is not a directory")

    def _opaque(self, parent: str) -> None:
        directory = os.path.join(self.dest, parent)
        os.setxattr(directory, OPAQUE_XATTR, b"y")
        self.stats.opaque.append(parent)

    def _whiteout(self, member: tarfile.TarInfo, parent: str, hidden: str) -> None:
        if not hidden or hidden in (".", "..") or hidden.startswith(WHITEOUT_PREFIX):
            raise LayerEntryError(member.name, "malformed whiteout")
        target = os.path.join(self.dest, parent, hidden)
        if os.path.lexists(target):
            _remove(target)
        os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        self.stats.whiteouts.append(posixpath.join(parent, hidden))

    def _check_type(self, member: tarfile.TarInfo, name: str) -> None:
        if member.ischr() or member.isblk():
            if member.ischr() and member.devmajor == 0 and member.devminor == 0:
                raise LayerEntryError(member.name, "a raw overlayfs whiteout (char 0:0); layers use .wh. files")
            if not name.startswith("dev/"):
                raise LayerEntryError(member.name, "device node outside /dev")
        elif not (member.isreg() or member.isdir() or member.issym() or member.islnk() or member.isfifo()):
            raise LayerEntryError(member.name, f"unsupported tar entry type {member.type!r}")
        for key in member.pax_headers:
            if key.startswith("SCHILY.xattr.trusted."):
                raise LayerEntryError(member.name, f"extended attribute {key[len('SCHILY.xattr.'):]!r} is not allowed")

    def _hardlink(self, member: tarfile.TarInfo, name: str) -> tarfile.TarInfo | None:
        link = member.linkname
        if link.startswith("/"):
            raise LayerEntryError(member.name, f"hard link to the absolute path {link!r}")
        parts = [part for part in link.split("/") if part not in ("", ".")]
        if not parts or ".." in parts:
            raise LayerEntryError(member.name, f"hard link to {link!r}, outside the layer")
        link = "/".join(parts)
        here = os.path.join(self.dest, link)
        if os.path.lexists(here):
            if os.path.realpath(os.path.dirname(here)) != os.path.dirname(here):
                raise LayerEntryError(member.name, f"hard link through a symlink ({link!r})")
            if os.path.isdir(here) and not os.path.islink(here):
                raise LayerEntryError(member.name, f"hard link to the directory {link!r}")
            member.linkname = link
            # like GNU tar: a link's own header never changes the file's mode, owner or mtime
            info = os.lstat(here)
            member.mode, member.uid, member.gid, member.mtime = stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, int(info.st_mtime)
            return member
        for lower in self.lowers:  # a file of a lower layer: copy it up, as overlayfs would
            source = lower / link
            if os.path.lexists(source) and not is_whiteout(source):
                if os.path.realpath(source.parent) != str(source.parent) or not source.is_file() or source.is_symlink():
                    raise LayerEntryError(member.name, f"hard link to {link!r}, not a regular file below")
                target = os.path.join(self.dest, name)
                shutil.copy2(source, target, follow_symlinks=False)
                info = os.lstat(source)
                os.lchown(target, info.st_uid, info.st_gid)
                os.chmod(target, stat.S_IMODE(info.st_mode))
                self.stats.hardlinks_copied += 1
                return None
            if os.path.lexists(source):
                break
        raise LayerEntryError(member.name, f"hard link to {link!r}, which no layer has")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _apply_xattrs(target: str, member: tarfile.TarInfo) -> None:
    for key, value in member.pax_headers.items():
        if not key.startswith("SCHILY.xattr."):
            continue
        name = key[len("SCHILY.xattr."):]
        if name.startswith(KEPT_XATTR_PREFIXES):
            os.setxattr(target, name, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)


def unpack(blob: BinaryIO, compression: str, dest: Path, diff_id: str, label: str,
           lowers: Iterable[Path] = (), budget: int | None = None) -> LayerStats:
    """Extract one layer blob into the empty directory `dest`; errors name `label` and the entry."""
    if os.geteuid() != 0:
        raise VmctlError(f"{label}: unpacking image layers needs root (owners, device nodes, whiteouts)")
    dest.mkdir(parents=True, exist_ok=True)
    if budget is None:
        budget = shutil.disk_usage(dest).free
    stream: BinaryIO = gzip.GzipFile(fileobj=blob, mode="rb") if compression == "gzip" else blob  # type: ignore[assignment]
    hashed = dg.HashingReader(stream)
    check = LayerFilter(dest, list(lowers), budget)
    current = "(the first header)"
    try:
        with tarfile.open(fileobj=hashed, mode="r|", errorlevel=2) as tar:  # type: ignore[call-overload]
            for member in tar:
                current = member.name
                tar.extract(member, str(dest), set_attrs=True, numeric_owner=True, filter=check)
                target = os.path.join(dest, member.name.strip("/"))
                if member.pax_headers and os.path.lexists(target) and not member.isdir():
                    _apply_xattrs(target, member)
            end = tar.offset  # where the end-of-archive marker (two zero blocks) must be
        hashed.drain()
        if hashed.count < end + 2 * tarfile.BLOCKSIZE:
            raise VmctlError(f"{label}: entry {current!r}: the layer ends without the end-of-archive "
                             f"marker after {hashed.count} bytes (truncated layer)")
        for target, member in reversed(check.directories):  # after their content: mtimes, xattrs
            current = member.name
            _apply_xattrs(target, member)
            os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)
    except LayerEntryError as error:
        raise VmctlError(f"{label}: entry {error.member!r}: {error.message}") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, UnicodeError) as error:  # Unicode: a pax header (fuzzing)
        raise VmctlError(f"{label}: entry {current!r}: {error} (truncated or corrupt layer)") from None
    except OSError as error:
        raise VmctlError(f"{label}: entry {current!r}: {error.strerror or error}") from None
    if hashed.digest != diff_id:
        raise VmctlError(f"{label}: uncompressed content is {dg.short(hashed.digest)}, "
                         f"the config's diff_id is {dg.short(diff_id)}")
    return check.stats


def lower_paths(layers: list[Path]) -> set[str]:
    """The paths of the merged view of `layers` (bottom first), whiteouts and opaque
    directories applied, as an overlay mount would show them."""
    present: set[str] = set()
    for layer in layers:
        apply_layer(present, layer)
    return present


def apply_layer(present: set[str], layer: Path) -> None:
    """Put one more layer on top of the merged view `present` (in place)."""
    def drop_below(rel: str) -> None:
        prefix = rel + "/"
        present.difference_update([p for p in present if p.startswith(prefix)])

    for dirpath, dirnames, filenames in os.walk(layer):
        rel_dir = os.path.relpath(dirpath, layer)
        rel_dir = "" if rel_dir == "." else rel_dir
        if rel_dir and _opaque(dirpath):
            drop_below(rel_dir)
        for name in dirnames + filenames:
            rel = posixpath.join(rel_dir, name)
            full = os.path.join(dirpath, name)
            if is_whiteout(full):
                present.discard(rel)
                drop_below(rel)
            else:
                if not os.path.isdir(full) or os.path.islink(full):
                    drop_below(rel)  # a file over a lower directory hides its content
                present.add(rel)


def _opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def check_whiteouts(stats_whiteouts: list[str], below: set[str], label: str) -> None:
    for path in stats_whiteouts:
        if path not in below:
            raise VmctlError(f"{label}: entry {posixpath.join(posixpath.dirname(path), WHITEOUT_PREFIX + posixpath.basename(path))!r}: "
                             f"whiteout of {path!r}, which the layers below do not have")
