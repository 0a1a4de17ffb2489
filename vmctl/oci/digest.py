"""sha256 digests as OCI writes them (`sha256:<64 hex>`), and reading that verifies them."""

from __future__ import annotations

import hashlib
import re
from typing import BinaryIO

from ..errors import VmctlError

ALGORITHM = "sha256"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
CHUNK = 1 << 20


def check(value: object, where: str) -> str:
    """`value` if it is a sha256 digest; a one-line error naming `where` otherwise."""
    if not isinstance(value, str) or not _DIGEST.match(value):
        shown = value if isinstance(value, str) and len(value) < 100 else type(value).__name__
        raise VmctlError(f"{where}: not a sha256 digest: {shown!r} (only sha256:<64 hex> is supported)")
    return value


def hex_part(digest: str) -> str:
    return digest.split(":", 1)[1]


def short(digest: str) -> str:
    return digest[:19]  # sha256:0123456789ab


def of_bytes(data: bytes) -> str:
    return f"{ALGORITHM}:{hashlib.sha256(data).hexdigest()}"


class HashingReader:
    """A file-like reader that hashes and counts everything read through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.hash.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        """Read the rest (a tar's trailing padding counts towards the digest too)."""
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> str:
        return f"{ALGORITHM}:{self.hash.hexdigest()}"
