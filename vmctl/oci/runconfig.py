"""An `image: oci:NAME[@sha256:…]` reference, and what the image says to run.

The backends call `open_image` (the store record, its config, its unpacked layers) and
`process` (argv, environment, working directory, user). Docker's rules: a command given in
the YAML (or after `--`) replaces the image's Cmd and keeps its Entrypoint; the YAML's
`environment` is added over the image's Env.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import VmctlError
from . import digest as dg
from .manifest import ImageConfig
from .store import ImageRecord, ImageStore, check_name
from .unpack import is_whiteout

PREFIX = "oci:"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def is_oci(image: str) -> bool:
    return image.startswith(PREFIX)


def parse_ref(text: str) -> tuple[str, str | None]:
    """'oci:NAME[@sha256:HEX]' -> (NAME, digest or None); a one-line error otherwise."""
    if not is_oci(text):
        raise VmctlError(f"image {text!r}: an OCI image is written oci:NAME[@sha256:…]")
    rest = text[len(PREFIX):]
    name, _, pinned = rest.partition("@")
    if not is_path(name):
        check_name(name)
    return name, (dg.check(pinned, f"image {text}") if pinned else None)


def is_path(name: str) -> bool:
    """oci:/abs/layout, oci:./rel.tar: a layout or archive imported on use."""
    return name.startswith(("/", "./", "../"))


@dataclass(frozen=True)
class OciImage:
    ref: str
    record: ImageRecord
    config: ImageConfig
    lowers: tuple[Path, ...]  # unpacked layers, top first (overlayfs lowerdir order)

    @property
    def diff_ids(self) -> list[str]:
        return self.record.diff_ids


def open_image(ref: str, store: ImageStore | None = None) -> OciImage:
    name, pinned = parse_ref(ref)
    store = store or ImageStore()
    if is_path(name):  # imported (again: what is already in the store is not copied twice)
        path = Path(name).resolve()
        name = f"path-{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"
        record = store.import_image(path, name)
    else:
        record = store.get(name)
    if pinned and pinned not in (record.manifest, record.config):
        raise VmctlError(f"image {ref}: {name} is {dg.short(record.manifest)} now, not {dg.short(pinned)}")
    lowers = tuple(store.lowers(record))
    for path in lowers:
        if not path.is_dir():
            raise VmctlError(f"image {ref}: layer {path.name[:12]} is missing from the store "
                             f"(vmctl image rm {name} and import it again)")
    return OciImage(ref, record, store.config(record), lowers)


@dataclass(frozen=True)
class Process:
    args: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int


def process(image: OciImage, command: tuple[str, ...] | list[str], environment: dict[str, str]) -> Process:
    config = image.config
    args = config.entrypoint + (tuple(command) if command else config.cmd)
    if not args:
        raise VmctlError(f"image {image.ref}: it has no Entrypoint or Cmd: give a command")
    env = {"PATH": DEFAULT_PATH, **config.environment(), **environment}
    uid, gid = resolve_user(config.user, image.lowers, image.ref)
    cwd = config.working_dir or "/"
    if not cwd.startswith("/"):
        cwd = "/" + cwd
    return Process(args, env, posixpath.normpath(cwd), uid, gid)


def find_file(lowers: tuple[Path, ...] | list[Path], rel: str) -> Path | None:
    """The file the merged view shows at `rel` (topmost layer first), or None."""
    for layer in lowers:
        path = layer / rel
        if is_whiteout(path):
            return None
        if path.is_file() and not path.is_symlink():
            return path
    return None


def _table(lowers, rel: str) -> list[list[str]]:
    found = find_file(lowers, rel)
    if found is None:
        return []
    return [line.split(":") for line in found.read_text(errors="replace").splitlines() if line and not line.startswith("#")]


def resolve_user(user: str, lowers, ref: str) -> tuple[int, int]:
    """Config.User (`name`, `uid`, `name:group`, `uid:gid`) as numbers, from the image's own
    /etc/passwd and /etc/group."""
    if not user:
        return 0, 0
    who, _, group = user.partition(":")
    passwd = _table(lowers, "etc/passwd")
    if re.fullmatch(r"\d+", who):
        uid = int(who)
        gid = next((int(row[3]) for row in passwd if len(row) > 3 and row[2] == who and row[3].isdigit()), 0)
    else:
        row = next((row for row in passwd if len(row) > 3 and row[0] == who), None)
        if row is None or not (row[2].isdigit() and row[3].isdigit()):
            raise VmctlError(f"image {ref}: User {user!r}: no user {who!r} in the image's /etc/passwd")
        uid, gid = int(row[2]), int(row[3])
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            row = next((row for row in _table(lowers, "etc/group") if len(row) > 2 and row[0] == group), None)
            if row is None or not row[2].isdigit():
                raise VmctlError(f"image {ref}: User {user!r}: no group {group!r} in the image's /etc/group")
            gid = int(row[2])
    return uid, gid
