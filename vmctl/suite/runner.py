"""Suites x columns: one command, one result. Cleans up everything it started on any exit.

Where the host's /dev/kvm cannot boot Linux, the VM columns (vm, qemu) run inside the nested
host together with their own native and container columns (nested.py), so every ratio in a
row is taken in one place.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import VmctlError
from .columns.base import COLUMN_NAMES, ColumnUnavailable, InstanceSpec, Runner, open_column
from .fleet import Fleet
from .model import HOST, NESTED, Column, SuiteRun
from .workloads import NEEDS_NETWORK, STEADY_SUITES, Params, check_tools, run_steady

SUITES = ("startup", "cpu", "memory", "disk", "net", "app", "density", "pagecache")
VM_COLUMNS = ("vm", "qemu")
NESTED_MAX_INSTANCES = 3


@dataclass
class Options:
    suites: list[str]
    columns: list[str]
    quick: bool = False
    instances: list[int] = field(default_factory=lambda: [1, 2, 4])
    image: str = "bench"
    skip_unavailable: bool = False
    memory_mib: int = 512
    progress_file: Path | None = None  # progress lines also go here (the nested host's stall watch)


def parse_suites(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in SUITES + ("all",):
            raise VmctlError(f"--suite: unknown suite {name!r} (one of: {', '.join(SUITES)}, all)")
    return list(SUITES) if "all" in names else [s for s in SUITES if s in names]


def parse_columns(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in COLUMN_NAMES:
            raise VmctlError(f"--only: unknown column {name!r} (one of: {', '.join(COLUMN_NAMES)})")
    return [c for c in COLUMN_NAMES if c in names]


def parse_instances(text: str) -> list[int]:
    try:
        counts = sorted({int(n) for n in text.split(",") if n.strip()})
    except ValueError:
        raise VmctlError(f"--instances: {text!r} is not a list of numbers like 1,2,4") from None
    if not counts or counts[0] < 1 or counts[-1] > 64:
        raise VmctlError(f"--instances: {text!r}: give counts from 1 to 64")
    return counts


class Progress:
    """One line per step on stderr: elapsed time, step k of K and an estimate of the rest."""

    def __init__(self, steps: int, prefix: str = "", copy: Path | None = None) -> None:
        self.copy = copy
        self.began = time.monotonic()
        self.steps = max(steps, 1)
        self.done = 0
        self.where = ""
        self.prefix = prefix

    def step(self, where: str) -> None:
        self.where = where
        self.say("start")

    def finish_step(self) -> None:
        self.done += 1

    def say(self, what: str) -> None:
        elapsed = time.monotonic() - self.began
        left = f", ~{elapsed / self.done * (self.steps - self.done) / 60:.0f} min left" if self.done else ""
        line = (f"[compare {self.prefix}{elapsed / 60:5.1f} min, step {min(self.done + 1, self.steps)}/{self.steps}"
                f"{left}] {self.where}: {what}")
        print(line, file=sys.stderr, flush=True)
        if self.copy is not None:
            with open(self.copy, "a") as out:
                out.write(line + "\n")


def needs_nested(columns: list[str]) -> bool:
    from ..host_probe import check_host

    if os.environ.get("VMCTL_NESTED") == "1" or not any(c in VM_COLUMNS for c in columns):
        return False
    return not check_host().boots_linux


def run(options: Options) -> SuiteRun:
    here = [c for c in options.columns if not (c in VM_COLUMNS and needs_nested(options.columns))]
    nested = [c for c in options.columns if c not in here]
    result = run_here(options, here)
    if nested:
        from .nested import run_in_nested_host

        try:
            result.merge(run_in_nested_host(options, nested))
        except VmctlError as error:
            # the host columns' results stay; the table says why the nested ones are missing
            result.columns += [Column(name, NESTED, name, "not run", f"nested host: {error}") for name in nested]
            result.failed = str(error)
    return result


def run_here(options: Options, names: list[str]) -> SuiteRun:
    from ..nested import scratch

    place = NESTED if os.environ.get("VMCTL_NESTED") == "1" else HOST
    from .scratchfs import direct_io_dir

    scratch_dir = scratch.make("vmctl-suite-")
    try:
        with direct_io_dir(scratch_dir) as work:
            return _run_in(options, names, place, work)
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)


def _run_in(options: Options, names: list[str], place: str, work: Path) -> SuiteRun:
    from .environment import describe

    fleet = Fleet()
    opened: list[Runner] = []
    result = SuiteRun(options.suites, options.quick, {})
    try:
        columns: list[tuple[Column, Runner]] = []
        for name in names:
            try:
                runner = open_column(name, options.image, work)
            except ColumnUnavailable as error:
                if not options.skip_unavailable:
                    raise
                result.columns.append(Column(name, place, name, "not run", str(error)))
                continue
            opened.append(runner)
            column = Column(name, place, runner.label)
            result.columns.append(column)
            columns.append((column, runner))
        from .columns.native import NativeColumn

        client_column = next((r for c, r in columns if c.name == "native"), None) or NativeColumn(options.image, work)
        client = fleet.start(client_column, InstanceSpec(image=options.image), 9999)
        result.environment = describe(client)
        params = Params.for_mode(options.quick, nested=place == NESTED)
        if place == NESTED and not options.quick and max(options.instances) > NESTED_MAX_INSTANCES:
            # every guest boots under TCG there (about a minute each): fewer, but the same curve
            options.instances = [n for n in options.instances if n <= NESTED_MAX_INSTANCES] or [1]
            result.notes.append(f"nested host: density and pagecache with {options.instances} instances")
        result.environment["params"] = asdict(params)
        steady = [s for s in options.suites if s in STEADY_SUITES]
        progress = Progress(1, "L1 " if place == NESTED else "", options.progress_file)
        plan = [(column, _steps(options, place, column, runner, steady, params, client, fleet, result, progress))
                for column, runner in columns]
        progress.steps = max(sum(len(steps) for _, steps in plan), 1)
        for column, steps in plan:
            for name, step in steps:
                progress.step(f"{name} · {column.key}")
                try:
                    step()
                except VmctlError as error:
                    # one failed step loses its own rows only; the run goes on and fails at the end
                    message = f"{name} · {column.key}: failed: {error}"
                    print(f"compare: {message}", file=sys.stderr, flush=True)
                    result.notes.append(message)
                    result.failed = result.failed or message
                progress.finish_step()
        return result
    finally:
        fleet.remove_all()
        for runner in reversed(opened):
            try:
                runner.close()
            except Exception as error:  # noqa: BLE001 - close the others, then say so
                print(f"compare: cleanup of {runner.name}: {error}", file=sys.stderr)


def _steps(options: Options, place: str, column: Column, runner: Runner, steady: list[str], params: Params,
           client, fleet: Fleet, result: SuiteRun, progress: Progress) -> list[tuple[str, Callable[[], None]]]:
    """(name, action) of each suite step of one column, in order."""
    spec = InstanceSpec(image=options.image, memory_mib=options.memory_mib)
    steps: list[tuple[str, Callable[[], None]]] = []
    if "startup" in options.suites:
        steps.append(("startup", lambda: _startup(result, column.key, runner, fleet, spec, params.startup_runs,
                                                  progress)))

    def steady_step() -> None:
        net = InstanceSpec(image=options.image, memory_mib=options.memory_mib,
                           network=bool(NEEDS_NETWORK & set(steady)))
        instance = fleet.start(runner, net, 0)
        try:
            check_tools(instance, steady)
            run_steady(result, column.key, instance, client, steady, params, progress.say)
        finally:
            fleet.remove([instance])

    if steady:
        steps.append((",".join(steady), steady_step))
    if column.name == "qemu" and place == NESTED and ({"density", "pagecache"} & set(options.suites)):
        # each QEMU guest under TCG costs as much as vmctl's: the many-instance suites are
        # measured on vmctl's VMM only there
        result.notes.append("qemu (L1): density and pagecache not run in the nested host (time)")
        return steps
    if "density" in options.suites:
        from .density import run_density

        steps.append(("density", lambda: run_density(result, column.key, runner, fleet, options.instances, spec,
                                                     progress.say)))

    def pagecache_step(variant: InstanceSpec, merge: bool = False) -> Callable[[], None]:
        from .pagecache import run_pagecache

        return lambda: run_pagecache(result, column.key, runner, fleet, options.instances, variant, options.quick,
                                     progress.say, merge=merge)

    if "pagecache" in options.suites:
        from .pagecache import ksm_available

        steps.append(("pagecache", pagecache_step(spec)))
        # the VM's levers, each its own step: one that fails loses its own rows only
        if column.name == "vm" and ksm_available():
            merge = InstanceSpec(image=options.image, memory_mib=options.memory_mib, memory_merge=True)
            steps.append(("pagecache+ksm", pagecache_step(merge, merge=True)))
        if column.name == "vm":
            dax = InstanceSpec(image=options.image, memory_mib=options.memory_mib, dax_base=True)
            steps.append(("pagecache+dax", pagecache_step(dax)))
    return steps


def _startup(result: SuiteRun, key: str, runner: Runner, fleet: Fleet, spec: InstanceSpec, runs: int,
             progress: Progress) -> None:
    for index in range(runs):
        progress.say(f"instance {index + 1}/{runs}")
        began = time.monotonic()
        instance = fleet.start(runner, spec, 100 + index)
        try:
            result.add("ready_s", key, time.monotonic() - began)
            began = time.monotonic()
            out = instance.run("true", timeout=120)
            result.add("exec_true_s", key, time.monotonic() - began)
            if out.exit_code != 0:
                raise VmctlError(f"{key}: `true` failed in a ready instance: {out.stderr.strip()[-200:]}")
        finally:
            fleet.remove([instance])
