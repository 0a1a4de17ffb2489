"""The OCI runtime binary (crun, else runc), driven through its command line.

vmctl writes the bundle and calls create/start/state/kill/delete/exec; it never does a
runtime's job itself. Each machine has its own runtime state directory (`--root`, inside
the machine's folder), so removing the folder removes every trace of it, and runs from
different vmctl state directories never see each other.

The cgroup driver is always cgroupfs: the container's cgroup is /vmctl/<container id> in
each hierarchy, a path vmctl can check and clean itself, whether or not systemd runs.

crun (1.8 at least) refuses cgroup v1/v2 "hybrid" hosts where any controller sits on the
v2 hierarchy; runc handles them. `choose` picks crun unless that is the case here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ...errors import VmctlError
from ...guest_contract import ExecResult

PREFERENCE = ("crun", "runc")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "vmctl"  # every container's cgroup is /vmctl/<id>


def cgroup_mode() -> str:
    """unified (v2 only), hybrid (v1 controllers, v2 mounted at /sys/fs/cgroup/unified), legacy."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return "unified"
    return "hybrid" if (CGROUP_ROOT / "unified" / "cgroup.controllers").exists() else "legacy"


REQUIRED_CONTROLLERS = ("memory", "cpu")  # for the spec's `memory` and `cpus`


def check_controllers() -> None:
    """The cgroup controllers the limits need; a one-line error naming the missing one."""
    mode = cgroup_mode()
    if mode == "unified":
        available = set((CGROUP_ROOT / "cgroup.controllers").read_text().split())
        where = f"{CGROUP_ROOT / 'cgroup.controllers'} lists {' '.join(sorted(available)) or 'none'}"
    else:
        available = {name for path in CGROUP_ROOT.iterdir() if path.is_dir() for name in path.name.split(",")}
        where = f"no {CGROUP_ROOT}/<controller> hierarchy is mounted for it"
    for controller in REQUIRED_CONTROLLERS:
        if controller not in available:
            raise VmctlError(f"the cgroup controller {controller!r} is missing ({where}): "
                             f"containers need it for their `{'memory' if controller == 'memory' else 'cpus'}` limit")


def _crun_usable() -> str | None:
    """Why crun cannot run here, or None."""
    if cgroup_mode() == "hybrid":
        controllers = (CGROUP_ROOT / "unified" / "cgroup.controllers").read_text().split()
        if controllers:
            return f"crun does not support cgroup hybrid mode with controllers on v2 ({', '.join(controllers)})"
    return None


def choose() -> "Runtime":
    """$VMCTL_OCI_RUNTIME if set, else crun, else runc; a one-line error naming the package."""
    wanted = os.environ.get("VMCTL_OCI_RUNTIME")
    if wanted:
        path = shutil.which(wanted)
        if path is None:
            raise VmctlError(f"VMCTL_OCI_RUNTIME={wanted}: not found on PATH")
        return Runtime(os.path.basename(wanted), path)
    crun, runc = shutil.which("crun"), shutil.which("runc")
    why_not_crun = _crun_usable() if crun else None
    if crun and not why_not_crun:
        return Runtime("crun", crun)
    if runc:
        return Runtime("runc", runc)
    if why_not_crun:
        raise VmctlError(f"{why_not_crun}: install runc (Debian package `runc`) for containers on this host")
    raise VmctlError("no OCI runtime for `backend: container`: install crun (Debian: apt-get install crun)")


def cgroup_dirs(container_id: str) -> list[Path]:
    """Where the container's cgroup lives, in each mounted hierarchy (v1 and/or v2)."""
    if cgroup_mode() == "unified":
        return [CGROUP_ROOT / CGROUP_PARENT / container_id]
    roots = [p for p in CGROUP_ROOT.iterdir() if p.is_dir() and not p.is_symlink()]
    return [root / CGROUP_PARENT / container_id for root in roots]


def remove_cgroups(container_id: str) -> None:
    """rmdir the container's (empty) cgroups a runtime that died mid-way left behind."""
    for path in cgroup_dirs(container_id):
        for child in sorted(path.glob("**/"), key=lambda p: len(p.parts), reverse=True) if path.exists() else []:
            try:
                child.rmdir()
            except OSError:
                pass
        try:
            path.parent.rmdir()  # /vmctl itself once no container uses it (fails while one does)
        except OSError:
            pass


@dataclass(frozen=True)
class Runtime:
    name: str  # crun | runc
    binary: str

    def _argv(self, root: Path, *args: str) -> list[str]:
        argv = [self.binary, "--root", str(root), "--log", str(root / "runtime.log"), "--log-format", "json"]
        if self.name == "crun":
            argv.append("--cgroup-manager=cgroupfs")
        return argv + list(args)

    def _run(self, machine: str, root: Path, *args: str, stdout: IO | int | None = None,
             stderr: IO | int | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        root.mkdir(parents=True, exist_ok=True)
        log = root / "runtime.log"
        before = log.stat().st_size if log.exists() else 0
        capture = stdout is None
        try:
            result = subprocess.run(self._argv(root, *args), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE if capture else stdout,
                                    stderr=subprocess.PIPE if stderr is None else stderr, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VmctlError(f"{machine}: {self.name} {args[0]} did not finish in {timeout:g} s") from None
        if result.returncode:
            message = _last_error(log, offset=before) or (result.stderr or b"").decode(errors="replace").strip()
            raise VmctlError(f"{machine}: {self.name} {args[0]} failed: {message or f'exit status {result.returncode}'}")
        return result

    def create(self, machine: str, root: Path, container_id: str, bundle: Path, pid_file: Path, stdio: IO) -> None:
        """The container's init waits (blocked before exec) until `start`; its stdout and
        stderr are `stdio`, inherited from the runtime (terminal: false)."""
        self._run(machine, root, "create", "--bundle", str(bundle), "--pid-file", str(pid_file), container_id,
                  stdout=stdio, stderr=stdio)

    def start(self, machine: str, root: Path, container_id: str) -> None:
        self._run(machine, root, "start", container_id)

    def state(self, root: Path, container_id: str) -> dict | None:
        """The runtime's view (status: created, running, stopped), or None if it has none."""
        if not root.exists():
            return None
        result = subprocess.run(self._argv(root, "state", container_id), stdin=subprocess.DEVNULL,
                                capture_output=True, timeout=30)
        if result.returncode:
            return None
        try:
            return json.loads(result.stdout)
        except ValueError:
            return None

    def kill(self, machine: str, root: Path, container_id: str, sig: int = signal.SIGTERM) -> None:
        self._run(machine, root, "kill", container_id, str(int(sig)))

    def delete(self, machine: str, root: Path, container_id: str, force: bool = False) -> None:
        self._run(machine, root, "delete", *(["--force"] if force else []), container_id)

    def exec(self, machine: str, root: Path, container_id: str, argv: list[str], timeout: float,
             stdin: bytes | None = None) -> ExecResult:
        """Run `argv` in the container's namespaces and cgroup (same capabilities and seccomp)."""
        log = root / "runtime.log"
        before = log.stat().st_size if log.exists() else 0
        # The runtime writes the host pid of the command here: on timeout the command (and
        # what it started) is killed in the container, not only the runtime's client.
        pid_file = root / f"exec-{os.getpid()}-{threading.get_ident()}.pid"
        pid_file.unlink(missing_ok=True)
        try:
            result = subprocess.run(self._argv(root, "exec", "--pid-file", str(pid_file), container_id, *argv),
                                    input=stdin if stdin is not None else b"", capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(pid_file)
            raise VmctlError(f"{machine}: the command did not finish in {timeout:g} s: killed") from None
        except BaseException:  # Ctrl-C, SIGTERM: the command does not outlive `vmctl exec`
            _kill_tree(pid_file)
            raise
        finally:
            pid_file.unlink(missing_ok=True)
        if result.returncode:  # the command's status, unless the runtime logged an error of its own
            failure = _last_error(log, offset=before)
            if failure:
                raise VmctlError(f"{machine}: {self.name} exec failed: {failure}")
        return ExecResult(result.returncode, result.stdout, result.stderr)


def _kill_tree(pid_file: Path) -> None:
    """SIGKILL the process in `pid_file` and every descendant (children first found, then killed)."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    tree, index = [pid], 0
    while index < len(tree):  # breadth-first through /proc/<pid>/task/<tid>/children
        for children in Path(f"/proc/{tree[index]}/task").glob("*/children"):
            try:
                tree += [int(child) for child in children.read_text().split()]
            except OSError:
                pass
        index += 1
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _last_error(log: Path, offset: int = 0) -> str | None:
    """The last error-level message of the runtime's JSON log written after `offset`."""
    try:
        with open(log, "rb") as handle:
            handle.seek(offset)
            lines = handle.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines[-50:]):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") in ("error", "fatal"):
            return str(entry.get("msg", "")).strip()
    return None
