"""The machinery shared by the image recipes: input hashing, atomic outputs, logs, progress.

A step's output is named by a hash of everything it is made from, so "current" simply
means "the final path exists". Outputs are written under a temporary name in the same
directory and renamed at the end: an interrupted build never leaves a half-written
artefact under a final name, and its leftovers are removed by the next run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import VmctlError
from ..proc import pid_alive

TMP_MARK = ".tmp-"


def digest(*parts: str | bytes) -> str:
    """A short stable hash of the given inputs (length-prefixed, so parts can't run together)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


Reporter = Callable[[str, str], None]


def stderr_reporter(step: str, message: str) -> None:
    print(f"[{step}] {message}", file=sys.stderr, flush=True)


def quiet_reporter(step: str, message: str) -> None:
    pass


@dataclass
class StepContext:
    """What a running step needs: its name (for messages), its log and a progress sink."""

    name: str
    log: Path
    report: Reporter = stderr_reporter
    env: dict[str, str] = field(default_factory=dict)

    def say(self, message: str) -> None:
        self.report(self.name, message)

    def fail(self, what: str) -> VmctlError:
        return VmctlError(f"{self.name}: {what} (log: {self.log})")

    def run(self, argv: Sequence[str | Path], what: str, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> None:
        """Run a command with its output appended to the log; fail with step and log."""
        args = [str(a) for a in argv]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        merged = {**os.environ, "LC_ALL": "C", **self.env, **(env or {})}
        with open(self.log, "ab") as log:
            log.write(f"\n$ {' '.join(args)}\n".encode())
            log.flush()
            try:
                result = subprocess.run(args, cwd=cwd, env=merged, stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            except FileNotFoundError:
                log.write(f"command not found: {args[0]}\n".encode())
                raise self.fail(f"{what}: command {args[0]!r} not found") from None
        if result.returncode != 0:
            raise self.fail(f"{what} failed (exit {result.returncode})")

    def note(self, text: str) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as log:
            log.write(text.rstrip("\n") + "\n")


def temp_sibling(final: Path) -> Path:
    """Where `final` is built: same directory (so rename is atomic), a name that says whose."""
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():  # e.g. read-only dirs inside a debootstrap tree
            subprocess.run(["rm", "-rf", "--", str(path)], check=False)
    else:
        path.unlink(missing_ok=True)


def clean_stale(directory: Path) -> None:
    """Drop temporaries of builds that died (their process is gone)."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if not entry.name.startswith(".") or TMP_MARK not in entry.name:
            continue
        pid = entry.name.rsplit(TMP_MARK, 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            remove(entry)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier run that happened to get our pid
    return pid_alive(pid)


@contextmanager
def atomic_output(final: Path, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to `final`, on any failure remove it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final.parent)
    tmp = temp_sibling(final)
    remove(tmp)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
        if final.exists():  # a forced rebuild: replace the old output
            remove(final)
        os.rename(tmp, final)
    except BaseException:
        remove(tmp)
        raise


DPKG_STATUS = Path("/var/lib/dpkg/status")
_dpkg_cache: dict[str, tuple[tuple[int, int], str | None]] = {}


def dpkg_version(package: str, status_file: Path = DPKG_STATUS) -> str | None:
    """The installed version of a Debian package, None if it is not installed.

    Read from dpkg's status database, not `dpkg-query`: `images.locate()` asks for two
    packages on every VM start, and two processes (each parsing the whole database) were
    most of `vmctl run`'s time before the VMM started in the nested host (benchmarks-run.md).
    Remembered per process until the database changes."""
    try:
        info = status_file.stat()
    except OSError:
        return _dpkg_query(package)
    stamp = (info.st_mtime_ns, info.st_size)
    known = _dpkg_cache.get(package)
    if known is not None and known[0] == stamp:
        return known[1]
    try:
        data = status_file.read_bytes()
    except OSError:
        return _dpkg_query(package)
    version = _installed_version(data, package)
    _dpkg_cache[package] = (stamp, version)
    return version


def _installed_version(data: bytes, package: str) -> str | None:
    """The Version of `package`'s stanza with Status "install ok installed" (dpkg-query's
    "ii"); of several (multi-arch), the first installed one."""
    needle = b"\n" + f"Package: {package}\n".encode()
    data = b"\n" + data  # the first stanza starts like every other one
    position = 0
    while (found := data.find(needle, position)) >= 0:
        end = data.find(b"\n\n", found + 1)
        end = len(data) if end < 0 else end
        lines = data[found + 1 : end].decode(errors="replace").splitlines()
        fields = dict(line.split(": ", 1) for line in lines if ": " in line and not line[0].isspace())
        if fields.get("Status") == "install ok installed" and fields.get("Version"):
            return fields["Version"]
        position = end
    return None


def _dpkg_query(package: str) -> str | None:
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${db:Status-Abbrev}${Version}", package],
            capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    out = result.stdout.strip()
    if result.returncode != 0 or not out.startswith("ii"):
        return None
    return out[2:].strip()


def require_packages(ctx: StepContext, packages: Sequence[str]) -> dict[str, str]:
    """Versions of the packages a step needs; stops the step naming the missing ones."""
    versions = {p: dpkg_version(p) for p in packages}
    missing = sorted(p for p, v in versions.items() if v is None)
    if missing:
        ctx.note(f"missing Debian packages: {' '.join(missing)}")
        raise ctx.fail(f"missing Debian package(s) {', '.join(missing)} "
                       f"(apt-get install {' '.join(missing)})")
    return {p: v for p, v in versions.items() if v is not None}
