"""Crash-consistency harness: a child process writes random data through the qcow2 layer and
is killed with SIGKILL at a random moment, or has its writes fail with ENOSPC/EIO from a
random point on. Afterwards `vmctl image check` and `qemu-img check` must find no
corruption (leaks are allowed), and every write flushed before the crash must read back.

The child logs each write before issuing it and each completed flush, so the parent knows
which bytes are settled (written and flushed, not overwritten since) and which are not.

Used by tests/unit/test_disk_qcow2_crashkill.py (a few iterations) and by
`scripts/qcow2-crash` (hundreds).
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import check as check_mod
from .create import CreateOptions, create

MiB = 1 << 20


@dataclass
class Outcome:
    seed: int
    fault: str  # "kill", "ENOSPC" or "EIO"
    writes_logged: int = 0
    flushed: int = 0
    problems: list[str] = field(default_factory=list)
    leaks: int = 0


def child(path: str, log_path: str, seed: int, fault: str) -> None:
    """Write until killed (or until injected faults stop the image)."""
    from ..block_backend import DiskError, open_disk

    rng = random.Random(seed)
    if fault in ("ENOSPC", "EIO"):
        _inject(rng, getattr(errno, fault))
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    count = 0
    try:
        with open_disk(path, read_only=False) as disk:
            size = disk.size
            while True:
                length = rng.choice([512, 4096, 65536, 300000, rng.randrange(1, 200000)])
                start = rng.randrange(0, size - length)
                pattern = rng.randrange(1, 256)
                if rng.random() < 0.1:
                    os.write(log, f"Z {start} {length}\n".encode())
                    disk.write_zeroes(start, length)
                else:
                    os.write(log, f"W {start} {length} {pattern}\n".encode())
                    disk.pwrite(start, bytes([pattern]) * length)
                count += 1
                if rng.random() < 0.25:
                    disk.flush()
                    os.write(log, f"F {count}\n".encode())
    except DiskError:
        os.write(log, b"E\n")  # an injected fault stopped the image: the run is over
        os._exit(3)


def _inject(rng: random.Random, code: int) -> None:
    """From a random moment on, some file writes and syncs fail with `code`."""
    start = time.monotonic() + rng.uniform(0.05, 0.6)
    rate = rng.choice([0.05, 0.3, 1.0])
    real_pwritev, real_pwrite, real_fdatasync = os.pwritev, os.pwrite, os.fdatasync

    def failing(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if time.monotonic() > start and rng.random() < rate:
                raise OSError(code, os.strerror(code))
            return real(*args)
        return call

    os.pwritev, os.pwrite, os.fdatasync = (failing(real_pwritev), failing(real_pwrite),
                                           failing(real_fdatasync))


def iteration(seed: int, workdir: str, fault: str = "kill") -> Outcome:
    rng = random.Random(seed)
    outcome = Outcome(seed, fault)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "crash.qcow2")
    log_path = os.path.join(workdir, "crash.log")
    for leftover in (path, log_path):
        if os.path.exists(leftover):
            os.unlink(leftover)
    cluster = 1 << rng.choice([9, 12, 16, 16, 21])
    bits = 1 << rng.randrange(7)
    size = 16 * MiB
    create(path, size, CreateOptions(cluster, 3, bits))
    open(log_path, "w").close()
    proc = subprocess.Popen([sys.executable, "-m", "vmctl.disk.qcow2.crashtest", "child", path,
                             log_path, str(seed), fault], stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=rng.uniform(0.3, 2.0))  # start-up ~0.2 s
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode not in (-signal.SIGKILL, 3):
        outcome.problems.append(f"child exited {proc.returncode}: {stderr.strip()[-400:]}")
    _verify(path, log_path, size, outcome)
    return outcome


def _verify(path: str, log_path: str, size: int, outcome: Outcome) -> None:
    with open(log_path) as file:
        lines = file.read().splitlines()
    ops: list[tuple[Any, ...]] = []
    flushed = 0
    for line in lines:
        parts = line.split()
        if not parts or parts[0] == "E":
            continue
        if parts[0] == "F":
            flushed = int(parts[1])
        elif len(parts) == (4 if parts[0] == "W" else 3):
            ops.append(tuple([parts[0]] + [int(p) for p in parts[1:]]))
    outcome.writes_logged, outcome.flushed = len(ops), flushed
    # settled bytes: what the flushed ops left, minus anything a later op may have touched
    expected = bytearray(size)
    for op in ops[:flushed]:
        start, length = op[1], op[2]
        expected[start:start + length] = bytes([op[3]]) * length if op[0] == "W" else \
            bytes(length)
    unsettled = bytearray(size)
    for op in ops[flushed:]:
        unsettled[op[1]:op[1] + op[2]] = b"\1" * op[2]
    report = check_mod.check(path)
    outcome.leaks = report.leaks
    if report.corruptions:
        outcome.problems.append(f"vmctl check: {report.corruptions} corruptions: "
                                f"{report.messages[:3]}")
    done = subprocess.run(["qemu-img", "check", path], capture_output=True, text=True)
    if done.returncode not in (0, 3):
        outcome.problems.append(f"qemu-img check exit {done.returncode}: "
                                f"{(done.stdout + done.stderr).strip()[-300:]}")
    from ..block_backend import open_disk
    with open_disk(path, read_only=True) as disk:
        data = disk.read(0, size)
    step = 65536
    for start in range(0, size, step):
        got, want, loose = data[start:start + step], expected[start:start + step], \
            unsettled[start:start + step]
        if got == want or not any(g != w and not u for g, w, u in zip(got, want, loose)):
            continue
        bad = next(start + i for i, (g, w, u) in enumerate(zip(got, want, loose))
                   if g != w and not u)
        outcome.problems.append(f"flushed byte {bad:#x} reads {data[bad]:#x}, expected "
                                f"{expected[bad]:#x}")
        break


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "child":
    child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
