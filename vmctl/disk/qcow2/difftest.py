"""Differential tester: one random operation sequence applied to an image through vmctl and,
on a copy, through qemu-io; both results must equal a raw mirror byte for byte (read by each
tool), and both `vmctl image check` and `qemu-img check` must find no corruption.

Used by tests/unit/test_disk_qcow2_difftest.py (a few seeds) and by
`scripts/qcow2-difftest` (as many seeds as time allows). Needs qemu-img and qemu-io.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

from ..block_backend import open_disk
from . import check as check_mod
from .create import CreateOptions, create, create_overlay

KiB, MiB = 1 << 10, 1 << 20


@dataclass
class Config:
    cluster_size: int
    compat: str  # "1.1" or "0.10"
    refcount_bits: int
    lazy_refcounts: bool
    maker: str  # "vmctl" or "qemu-img"
    backing: bool
    size: int

    @classmethod
    def random(cls, rng: random.Random) -> "Config":
        cluster = 1 << rng.choice([9, 9, 10, 12, 16, 16, 17, 21])
        compat = rng.choice(["1.1", "1.1", "0.10"])
        bits = 16 if compat == "0.10" else 1 << rng.randrange(7)
        size = rng.choice([1, 3, 8, 24]) * MiB + rng.choice([0, 512, 7 * 512])
        return cls(cluster, compat, bits, compat == "1.1" and rng.random() < 0.2,
                   rng.choice(["vmctl", "qemu-img"]), rng.random() < 0.5, size)


@dataclass
class Result:
    seed: int
    config: Config
    ops: list[tuple[Any, ...]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _make(path: str, config: Config, backing: str | None) -> None:
    if config.maker == "vmctl":
        options = CreateOptions(config.cluster_size, 3 if config.compat == "1.1" else 2,
                                config.refcount_bits, config.lazy_refcounts)
        if backing:
            create_overlay(backing, path, size=config.size, options=options)
        else:
            create(path, config.size, options)
        return
    opts = (f"cluster_size={config.cluster_size},compat={config.compat},"
            f"refcount_bits={config.refcount_bits}")
    if config.lazy_refcounts:
        opts += ",lazy_refcounts=on"
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        args += ["-b", os.path.basename(backing), "-F", "qcow2"]
    subprocess.run(args + [path, str(config.size)], check=True, capture_output=True,
                   cwd=os.path.dirname(path))


def _ops(rng: random.Random, config: Config, count: int) -> list[tuple[Any, ...]]:
    cs, size = config.cluster_size, config.size
    ops: list[tuple[Any, ...]] = []
    for _ in range(count):
        kind = rng.choices(["write", "zero", "discard", "flush"], [8, 2, 2, 1])[0]
        if kind == "flush":
            ops.append(("flush",))
            continue
        if rng.random() < 0.5:  # sector-aligned, sometimes many clusters
            start = rng.randrange(0, size // 512) * 512
            length = min(size - start, rng.choice([512, 4 * KiB, cs, 3 * cs, 256 * KiB]))
        else:
            start = rng.randrange(0, size - 1)
            length = min(size - start, rng.randrange(1, 3 * cs + 2))
        if kind == "discard":  # whole clusters only: partial discards are tool-specific
            first, last = -(-start // cs) * cs, (start + length) // cs * cs
            if last <= first or (config.backing and config.compat == "0.10"):
                continue
            start, length = first, last - first
        if kind == "zero":  # qemu-io's write -z wants sectors
            start, length = start // 512 * 512, max(512, length // 512 * 512)
            length = min(length, size - start)
        ops.append((kind, start, length, rng.randrange(1, 256)))
    return ops


def _apply_mirror(mirror: bytearray, op: tuple[Any, ...]) -> None:
    if op[0] == "write":
        _, start, length, pattern = op
        mirror[start:start + length] = bytes([pattern]) * length
    elif op[0] in ("zero", "discard"):
        _, start, length, _ = op
        mirror[start:start + length] = bytes(length)


def _apply_vmctl(path: str, ops: list[tuple[Any, ...]]) -> None:
    with open_disk(path, read_only=False) as disk:
        for op in ops:
            if op[0] == "write":
                disk.pwrite(op[1], bytes([op[3]]) * op[2])
            elif op[0] == "zero":
                disk.write_zeroes(op[1], op[2])
            elif op[0] == "discard":
                disk.discard(op[1], op[2])
            else:
                disk.flush()


def _apply_qemu(path: str, ops: list[tuple[Any, ...]]) -> None:
    commands = []
    for op in ops:
        if op[0] == "write":
            commands.append(f"write -P {op[3]} {op[1]} {op[2]}")
        elif op[0] == "zero":
            commands.append(f"write -z {op[1]} {op[2]}")
        elif op[0] == "discard":
            commands.append(f"discard {op[1]} {op[2]}")
        else:
            commands.append("flush")
    for start in range(0, len(commands), 200):  # keep argv short
        args = ["qemu-io"]
        for command in commands[start:start + 200]:
            args += ["-c", command]
        done = subprocess.run(args + [path], capture_output=True, text=True)
        if done.returncode or "failed" in done.stdout + done.stderr:
            raise RuntimeError(f"qemu-io: {(done.stdout + done.stderr).strip()[-300:]}")


def _read_vmctl(path: str) -> bytes:
    with open_disk(path, read_only=True) as disk:
        return disk.read(0, disk.size)


def _read_qemu(path: str, workdir: str) -> bytes:
    raw = os.path.join(workdir, "qemu-read.raw")
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", path, raw], check=True,
                   capture_output=True)
    with open(raw, "rb") as file:
        data = file.read()
    os.unlink(raw)
    return data


def _checks(path: str, who: str, problems: list[str]) -> None:
    report = check_mod.check(path)
    if report.corruptions or report.leaks:
        problems.append(f"{who} image: vmctl check: {report.corruptions} corruptions, "
                        f"{report.leaks} leaks: {report.messages[:3]}")
    done = subprocess.run(["qemu-img", "check", "--output=json", path], capture_output=True,
                          text=True)
    if done.returncode:
        problems.append(f"{who} image: qemu-img check exit {done.returncode}: "
                        f"{done.stdout.strip()[-300:]} {done.stderr.strip()[-300:]}")
    else:
        theirs = json.loads(done.stdout)
        if (theirs.get("allocated-clusters"), theirs.get("image-end-offset")) != \
                (report.allocated_clusters, report.image_end_offset):
            problems.append(f"{who} image: check figures differ: vmctl "
                            f"{report.allocated_clusters}/{report.image_end_offset}, qemu "
                            f"{theirs.get('allocated-clusters')}/"
                            f"{theirs.get('image-end-offset')}")


def _make_chain(rng: random.Random, config: Config, workdir: str, mirror: bytearray) -> str:
    """One or two backing levels under the test image, each with random content written by
    qemu-io; the lowest one sometimes made by `qemu-img convert -c` (compressed clusters, so
    copy-on-write has to inflate them). Fills `mirror` with what the chain reads as."""
    size = rng.choice([config.size, config.size // 2])
    level_config = Config(config.cluster_size, config.compat, config.refcount_bits, False,
                          config.maker, False, size)
    below: str | None = None
    for level in range(rng.choice([1, 1, 2])):
        path = os.path.join(workdir, f"base{level}.qcow2")
        ops = [op for op in _ops(rng, level_config, 8) if op[0] == "write"]
        if level == 0 and rng.random() < 0.3:
            raw = bytearray(size)
            for op in ops:
                _apply_mirror(raw, op)
            raw_path = os.path.join(workdir, "base.raw")
            with open(raw_path, "wb") as file:
                file.write(raw)
            subprocess.run(["qemu-img", "convert", "-q", "-c", "-O", "qcow2", "-o",
                            f"cluster_size={config.cluster_size},compat={config.compat},"
                            f"refcount_bits={config.refcount_bits}", raw_path, path],
                           check=True, capture_output=True)
            os.unlink(raw_path)
        else:
            _make(path, level_config, below)
            _apply_qemu(path, ops)
        for op in ops:
            _apply_mirror(mirror, op)
        below = path
    assert below is not None  # at least one level
    return below


def run(seed: int, workdir: str, op_count: int = 40) -> Result:
    """One seed: a random configuration and operation sequence; returns what differed."""
    rng = random.Random(seed)
    config = Config.random(rng)
    result = Result(seed, config)
    os.makedirs(workdir, exist_ok=True)
    ours = os.path.join(workdir, "ours.qcow2")
    theirs = os.path.join(workdir, "theirs.qcow2")
    mirror = bytearray(config.size)
    base = _make_chain(rng, config, workdir, mirror) if config.backing else None
    try:
        _make(ours, config, base)
        shutil.copy(ours, theirs)
        result.ops = _ops(rng, config, op_count)
        for op in result.ops:
            _apply_mirror(mirror, op)
        _apply_vmctl(ours, result.ops)
        _apply_qemu(theirs, result.ops)
        expected = bytes(mirror)
        for who, path in (("vmctl-written", ours), ("qemu-written", theirs)):
            for reader, data in (("vmctl", _read_vmctl(path)),
                                 ("qemu-img", _read_qemu(path, workdir))):
                if data != expected:
                    at = next(i for i in range(len(expected)) if data[i:i + 1] != expected[i:i + 1])
                    result.problems.append(f"{who} image read by {reader} differs from the "
                                           f"mirror at byte {at:#x}")
            _checks(path, who, result.problems)
    except Exception as error:  # a crash of either tool is a finding too
        result.problems.append(f"{type(error).__name__}: {error}")
    return result
