"""NestedHost: run one command inside an L1 Linux with (emulated) hardware KVM.

A test harness only: it boots Debian's kernel under QEMU TCG with an emulated AMD-V CPU,
so that /dev/kvm inside is hardware-style KVM (kvm_amd) even where the host's own
/dev/kvm cannot boot Linux guests. L1 sees the host's whole filesystem (read-only 9p
under an in-memory overlay), so the checkout, the venv and every package are the same
paths inside; only the shared directories write through to the host.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..errors import VmctlError
from . import initramfs, scratch
from .initramfs import EXIT_MARKER, FAILED_MARKER, READY_MARKER, Share
from .l1_kernel import L1Kernel, ensure_kernel
from .l1_qemu import L1Machine, die_with_parent, monitor_command

# Host variables a command inside L1 inherits (besides VMCTL_*): enough to find the same
# tools and caches, nothing tied to this particular process.
PASSTHROUGH_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TERM", "TZ", "VIRTUAL_ENV")
MSIZE = 512000  # 9p message size: the virtio transport's maximum; fewer round trips
POWEROFF_GRACE = 30.0  # seconds QEMU gets to exit after the command finished
POLL = 0.1
MIN_MEMORY_MIB = 256  # the kernel, the initramfs and a tmpfs overlay must fit


class NestedHostError(VmctlError):
    """The nested host failed (not the command inside it); `console_tail` says why."""

    def __init__(self, message: str, console_tail: str = "", cpu_state: str = "") -> None:
        super().__init__(f"{message} [L1 {cpu_state}]" if cpu_state else message)
        self.console_tail = console_tail
        self.partial: tuple[str, str] = ("", "")  # what the command wrote before (stdout, stderr)


class NestedTimeout(NestedHostError):
    """The run did not finish in time; QEMU was killed."""


class NestedStall(NestedTimeout):
    """The command's progress file stopped changing for too long; QEMU was killed."""


@dataclass(frozen=True)
class NestedResult:
    exit_code: int
    stdout: str
    stderr: str
    console_log: str
    boot_seconds: float  # QEMU start until L1 is ready to run the command
    command_seconds: float
    total_seconds: float


def _with_hidden_cwd(shares: Sequence[Path], cwd: Path) -> list[Path]:
    """`shares`, plus `cwd` when it lies under a directory L1 replaces with an empty tmpfs
    (a checkout cloned into /tmp must still be there inside)."""
    resolved = [Path(p).resolve() for p in shares]
    hidden = any(cwd.is_relative_to(h) for h in initramfs.HIDDEN_DIRS)
    if hidden and not any(cwd.is_relative_to(p) for p in resolved):
        resolved.append(cwd)
    return resolved


def _stderr_progress(message: str) -> None:
    print(f"[nested] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Stall:
    """`path` (written by the command, on a share) must change at least every `seconds`."""

    path: Path
    seconds: float

    def stamp(self) -> tuple[int, int] | None:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            return None
        return info.st_size, info.st_mtime_ns


@dataclass
class NestedHost:
    """Settings of the L1 machine; each run() boots a fresh one and powers it off."""

    memory_mib: int = 4096
    cpus: int = 2
    shares: Sequence[Path] = ()  # host directories L1 writes through to, mounted at the same path
    extra_cmdline: str = ""
    progress: Callable[[str], None] = field(default=_stderr_progress)
    keep_dir: bool = False  # leave the run's temp dir (console log, initramfs) for debugging

    def run(
        self,
        command: Sequence[str],
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
        stall: Stall | None = None,
    ) -> NestedResult:
        """Boot L1, run `command` (argv) in `cwd` (default: ours) and return its outcome.

        The command's environment is command_environment(env): a few of our variables plus
        `env`. `timeout` covers everything from QEMU start to power-off; `stall` ends the
        run early when a file the command keeps writing stops changing.
        """
        if not command:
            raise VmctlError("no command to run in the nested host")
        if self.cpus < 1 or self.memory_mib < MIN_MEMORY_MIB:
            raise VmctlError(f"the nested host needs at least 1 vCPU and {MIN_MEMORY_MIB} MiB")
        kernel = ensure_kernel(self.progress)
        work = scratch.make("vmctl-nested-")
        try:
            return self._run_in(work, kernel, list(command), Path(cwd or os.getcwd()).resolve(), env, timeout, stall)
        finally:
            if self.keep_dir:
                self.progress(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)

    def _run_in(
        self, work: Path, kernel: L1Kernel, command: list[str], cwd: Path,
        env: Mapping[str, str] | None, timeout: float, stall: Stall | None,
    ) -> NestedResult:
        io_dir = work / "io"
        io_dir.mkdir()
        shares = [Share("io", io_dir)] + [
            Share(f"share{i}", path) for i, path in enumerate(_with_hidden_cwd(self.shares, cwd))
        ]
        for share in shares:
            if not share.path.is_dir():
                raise VmctlError(f"nested host share {share.path} is not a directory")
        (io_dir / "command.sh").write_text(command_script(command, cwd, command_environment(env, nested=True)))
        plan = initramfs.plan_script(io_dir, shares, MSIZE)
        machine = L1Machine(
            kernel=kernel.boot_image,
            initramfs=initramfs.build(work / "initramfs.cpio", kernel, plan),
            console_log=work / "console.log",
            monitor=work / "monitor.sock",
            memory_mib=self.memory_mib,
            cpus=self.cpus,
            shares=shares,
            extra_cmdline=self.extra_cmdline,
        )
        self.progress(f"booting L1 (TCG, emulated AMD-V, {self.cpus} vCPUs, {self.memory_mib} MiB)…")
        watch = _Watch(machine, work / "qemu.stderr", self.progress, stall)
        try:
            watch.supervise(timeout, _one_line(shlex.join(command)))
        except (KeyboardInterrupt, NestedHostError) as error:
            # Ctrl-C, a timeout: keep what the command wrote so far (the I/O share goes with `work`).
            error.partial = (_read(io_dir / "stdout"), _read(io_dir / "stderr"))  # type: ignore[union-attr]
            raise
        return NestedResult(
            exit_code=_exit_code(io_dir, watch),
            stdout=_read(io_dir / "stdout"),
            stderr=_read(io_dir / "stderr"),
            console_log=watch.console,
            boot_seconds=watch.ready_at - watch.started,
            command_seconds=watch.done_at - watch.ready_at,
            total_seconds=watch.ended - watch.started,
        )


def command_environment(extra: Mapping[str, str] | None, nested: bool) -> dict[str, str]:
    """PASSTHROUGH_ENV and VMCTL_* from ours, VMCTL_NESTED=1 inside L1, then `extra`."""
    chosen = {k: v for k, v in os.environ.items() if k in PASSTHROUGH_ENV or k.startswith("VMCTL_")}
    if nested:
        chosen["VMCTL_NESTED"] = "1"
    chosen.update(extra or {})
    return chosen


def command_script(command: list[str], cwd: Path, env: Mapping[str, str]) -> str:
    """The /bin/sh script L1 runs (chrooted into the host's root): cd, clean env, exec."""
    if "=" in command[0]:
        raise VmctlError(f"command name {command[0]!r} contains '=' (env would take it for a variable)")
    assignments = [f"{key}={value}" for key, value in sorted(env.items())]
    return (
        "umask 022\n"
        f"cd {shlex.quote(str(cwd))} || exit 127\n"
        f"exec /usr/bin/env -i {shlex.join(assignments)} {shlex.join(command)}\n"
    )


class _Watch:
    """QEMU as a child process, its console followed until the command's exit marker."""

    def __init__(
        self, machine: L1Machine, stderr_path: Path, progress: Callable[[str], None], stall: Stall | None = None,
    ) -> None:
        self.machine = machine
        self.stderr_path = stderr_path
        self.progress = progress
        self.stall = stall
        self._stamp: tuple[int, int] | None = None
        self._changed_at = 0.0
        self.console = ""
        self.started = self.ready_at = self.done_at = self.ended = 0.0

    def supervise(self, timeout: float, what: str) -> None:
        with self.stderr_path.open("wb") as stderr:
            self.started = time.monotonic()
            process = subprocess.Popen(
                self.machine.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=stderr, start_new_session=True, preexec_fn=die_with_parent(),
            )
        try:
            self._follow(process, timeout, what)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()
            self.ended = time.monotonic()
            self._read_console()

    def _follow(self, process: subprocess.Popen, timeout: float, what: str) -> None:
        deadline = self.started + timeout
        while True:
            exited = process.poll() is not None
            self._read_console()
            now = time.monotonic()
            if not self.ready_at and READY_MARKER in self.console:
                self.ready_at = now
                self.progress(f"L1 up after {now - self.started:.1f} s; running: {what}")
            if not self.done_at and EXIT_MARKER in self.console:
                self.done_at = now
                deadline = min(deadline, now + POWEROFF_GRACE)
            if FAILED_MARKER in self.console:
                reason = self.console.split(FAILED_MARKER, 1)[1].strip().splitlines()[0]
                raise NestedHostError(f"L1 setup failed: {reason}", self.tail())
            if exited:
                break
            if now >= deadline:
                if self.done_at:
                    break  # the command finished; only the power-off hangs
                stage = "running the command" if self.ready_at else "booting L1"
                raise NestedTimeout(
                    f"nested host timed out after {timeout:g} s ({stage}); QEMU killed", self.tail(), self.cpu_state()
                )
            if self._stalled(now):
                raise NestedStall(
                    f"nested host made no progress for {self.stall.seconds:g} s ({self.stall.path.name} unchanged); "
                    "QEMU killed", self.tail(), self.cpu_state(),
                )
            time.sleep(POLL)
        if not self.done_at:
            # QEMU's own stderr says why when it failed; TCG's feature warnings never do.
            errors = [line for line in _read(self.stderr_path).splitlines() if line.strip() and "warning:" not in line]
            console = self.tail().splitlines()
            why = errors[-1] if process.returncode and errors else (console or ["no console output"])[-1]
            raise NestedHostError(
                f"QEMU exited (code {process.returncode}) before the command finished: {why}", self.tail()
            )
        self.progress(f"command exited after {self.done_at - self.ready_at:.1f} s")

    def _stalled(self, now: float) -> bool:
        if self.stall is None or not self.ready_at or self.done_at:
            return False
        stamp = self.stall.stamp()
        if stamp != self._stamp or not self._changed_at:
            self._stamp, self._changed_at = stamp, now
        return now - self._changed_at > self.stall.seconds

    def cpu_state(self) -> str:
        """Each L1 vCPU's RIP/CPL/HLT from QEMU's monitor: where a hung L1 is spinning."""
        if self.machine.monitor is None:
            return ""
        registers = monitor_command(self.machine.monitor, "info registers -a")
        cpus = re.findall(r"^CPU#(\d+).*?^RIP=(\S+) .*?CPL=(\d) .*?HLT=(\d)", registers, re.M | re.S)
        return "; ".join(f"vCPU{n} RIP={rip} CPL={cpl} HLT={hlt}" for n, rip, cpl, hlt in cpus)

    def _read_console(self) -> None:
        self.console = _read(self.machine.console_log)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.console.splitlines()[-lines:])


def _exit_code(io_dir: Path, watch: _Watch) -> int:
    recorded = io_dir / "exit-code"
    if recorded.exists():
        return int(recorded.read_text().strip())
    # The file goes through 9p; the console marker is the fallback.
    return int(watch.console.split(EXIT_MARKER, 1)[1].split()[0])


def _one_line(text: str, width: int = 100) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return ""
