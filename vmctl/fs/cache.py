"""How much a FUSE client may cache from the file server: `cache: auto|always|never` per share.

The names and their meaning follow virtiofsd's `--cache`. What each mode trades is how long
another writer's change (the host, another guest, another mount of the same folder) can stay
invisible to this client:

- `never`: nothing is cached (entries and attributes expire at once, file data bypasses the
  page cache with FOPEN_DIRECT_IO). Every change is visible at the next system call; every
  system call is a round trip to the server.
- `auto` (the default): names and attributes are cached for 1 s; file data stays in the page
  cache across opens and is dropped when the client sees another mtime or size
  (FUSE_AUTO_INVAL_DATA), directory listings likewise (FOPEN_CACHE_DIR, checked against the
  directory's mtime). Another writer's change shows within about 1 s.
- `always`: the same, but names and attributes are kept for a day: a second read of an
  unchanged tree is served by the client's caches alone. Another writer's change may stay
  invisible until the client drops its caches (or a day passes): for folders only this
  client writes, or that nobody writes.

In `auto` and `always`, opens need no message (OPEN and OPENDIR answered ENOSYS: the kernel
then opens files and directories by itself, FUSE_NO_OPEN_SUPPORT / _NO_OPENDIR_SUPPORT, with
FOPEN_KEEP_CACHE and, for directories, FOPEN_CACHE_DIR; READ/WRITE/READDIR come with handle 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import protocol as p

MODES = ("auto", "always", "never")
DEFAULT = "auto"


@dataclass(frozen=True)
class CachePolicy:
    mode: str
    timeout: int  # seconds the client may keep names (entry_valid) and attributes (attr_valid)
    no_open: bool  # answer OPEN/OPENDIR with ENOSYS: the kernel stops sending OPEN(DIR)/RELEASE(DIR)
    file_flags: int  # fuse_open_out.open_flags for files (CREATE; OPEN when answered)
    dir_flags: int  # ... and for OPENDIR when answered


POLICIES = {
    "never": CachePolicy("never", 0, False, p.FOPEN_DIRECT_IO, 0),
    "auto": CachePolicy("auto", 1, True, p.FOPEN_KEEP_CACHE, p.FOPEN_KEEP_CACHE | p.FOPEN_CACHE_DIR),
    "always": CachePolicy("always", 86400, True, p.FOPEN_KEEP_CACHE, p.FOPEN_KEEP_CACHE | p.FOPEN_CACHE_DIR),
}


def policy(mode: str) -> CachePolicy:
    try:
        return POLICIES[mode]
    except KeyError:
        raise ValueError(f"cache mode {mode!r}: expected one of {', '.join(MODES)}") from None
