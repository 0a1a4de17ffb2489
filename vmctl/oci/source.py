"""Where an image comes from: an OCI layout directory, or a tar archive of one (OCI archive)
or of `docker save`'s format. Read-only, and only by names the image's own JSON gives, each
checked to stay inside the source (a manifest naming `../../etc/shadow` is an error)."""

from __future__ import annotations

import contextlib
import io
import lzma
import os
import posixpath
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from ..errors import VmctlError

JSON_LIMIT = 8 << 20  # index/manifest/config blobs are small; a bigger one is hostile or broken
# UnicodeError: a pax header whose charset or values do not decode (tarfile lets it out);
# LZMAError: an xz archive's corrupt stream. Both found by fuzzing.
READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError, UnicodeError, lzma.LZMAError)


def inner_name(name: object, where: str) -> str:
    """A relative POSIX name inside the source, normalised; anything leaving it is an error."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise VmctlError(f"{where}: not a file name: {name!r}")
    if name.startswith("/"):
        raise VmctlError(f"{where}: absolute path {name!r} (names are relative to the image)")
    normal = posixpath.normpath(name)
    if normal == ".." or normal.startswith("../"):
        raise VmctlError(f"{where}: path {name!r} leaves the image")
    return normal


class Source:
    label: str

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[tuple[BinaryIO, int]]:
        raise NotImplementedError
        yield  # pragma: no cover

    def read_small(self, name: str, where: str) -> bytes:
        with self.open(name) as (handle, size):
            if size > JSON_LIMIT:
                raise VmctlError(f"{where}: {name} is {size} bytes, more than the {JSON_LIMIT >> 20} MiB allowed for JSON")
            try:
                data = handle.read(size + 1)
            except READ_ERRORS as error:
                raise VmctlError(f"{self.label}: {name}: cannot read: {error}") from None
        if len(data) != size:
            raise VmctlError(f"{self.label}: {name}: truncated ({len(data)} of {size} bytes)")
        return data

    def close(self) -> None:
        pass


@dataclass
class DirSource(Source):
    root: Path

    def __post_init__(self) -> None:
        self.label = str(self.root)

    def _path(self, name: str) -> Path:
        path = self.root / inner_name(name, self.label)
        # a symlink inside the layout must not lead out of it either
        real, root = os.path.realpath(path), os.path.realpath(self.root)
        if os.path.commonpath([real, root]) != root:
            raise VmctlError(f"{self.label}: {name} leads outside the layout ({real})")
        return path

    def exists(self, name: str) -> bool:
        return self._path(name).is_file()

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[tuple[BinaryIO, int]]:
        path = self._path(name)
        try:
            handle = open(path, "rb")
        except FileNotFoundError:
            raise VmctlError(f"{self.label}: {name}: missing") from None
        with handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise VmctlError(f"{self.label}: {name}: not a regular file")
            yield handle, info.st_size


@dataclass
class TarSource(Source):
    path: Path
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.label = str(self.path)
        try:
            self.tar = tarfile.open(self.path, "r:*")
            for member in self.tar:
                if member.isfile():
                    self.members[posixpath.normpath(member.name.lstrip("/"))] = member
        except READ_ERRORS as error:
            # "r:*" lists each method it tried on lines of its own; the tar one says why
            reason = str(error).strip().splitlines()[-1].lstrip("- ") if str(error).strip() else repr(error)
            raise VmctlError(f"{self.label}: not a readable tar archive: {reason}") from None

    def exists(self, name: str) -> bool:
        return inner_name(name, self.label) in self.members

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[tuple[BinaryIO, int]]:
        member = self.members.get(inner_name(name, self.label))
        if member is None:
            raise VmctlError(f"{self.label}: {name}: missing from the archive")
        handle = self.tar.extractfile(member)
        assert handle is not None
        yield _Guarded(handle, f"{self.label}: {name}"), member.size  # type: ignore[misc, arg-type]  # file-like

    def close(self) -> None:
        self.tar.close()


class _Guarded(io.RawIOBase):
    """Reads of an archive member; a truncated archive is a one-line error naming the member."""

    def __init__(self, raw: BinaryIO, where: str) -> None:
        self.raw, self.where = raw, where

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        try:
            return self.raw.read(size)
        except READ_ERRORS as error:
            raise VmctlError(f"{self.where}: cannot read: {error} (truncated archive?)") from None

    def readable(self) -> bool:
        return True


def open_source(path: Path) -> Source:
    if path.is_dir():
        return DirSource(path)
    if path.is_file():
        return TarSource(path)
    raise VmctlError(f"{path}: no such file or directory")
