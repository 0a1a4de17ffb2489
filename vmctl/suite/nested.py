"""The VM columns inside the nested host, with their own native and container columns.

The same `vmctl compare --suite` runs in L1 (VMCTL_NESTED=1 there, so its columns are marked
"nested L1") and writes JSON to a directory shared with the host; its progress lines come
back on stderr when L1 is done.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

from ..errors import VmctlError
from .model import SuiteRun

L1_MEMORY_MIB = 6144
TIMEOUT_S = {True: 3600.0, False: 4 * 3600.0}  # quick, full


@contextlib.contextmanager
def _nested_lock() -> Iterator[None]:
    """On a machine shared by several users of nested hosts (each one wants most of the CPU),
    VMCTL_NESTED_LOCK names a file to flock around the L1 run: they take turns."""
    path = os.environ.get("VMCTL_NESTED_LOCK")
    if not path:
        yield
        return
    with open(path, "a") as handle:
        print(f"compare: waiting for {path} (another nested host is running)", file=sys.stderr, flush=True)
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_in_nested_host(options, columns: list[str]) -> SuiteRun:
    from ..nested import NestedHost, scratch
    from ..nested.l1_host import Stall

    inner_columns = ["native", "container"] + columns
    exchange = scratch.make("vmctl-suite-nested-")
    try:
        out = exchange / "result.json"
        log = exchange / "progress.log"
        argv = [sys.executable, "-m", "vmctl", "compare", "--suite", ",".join(options.suites),
                "--only", ",".join(inner_columns), "--image", options.image, "--skip-unavailable",
                "--instances", ",".join(map(str, options.instances)), "--json", str(out),
                "--progress-file", str(log)]
        if options.quick:
            argv.append("--quick")
        print(f"compare: {', '.join(columns)}: this host's /dev/kvm cannot boot Linux; running them in the "
              f"nested host with their own native and container columns", file=sys.stderr, flush=True)
        host = NestedHost(memory_mib=L1_MEMORY_MIB, cpus=2, shares=[exchange],
                          progress=lambda message: print(f"[nested] {message}", file=sys.stderr, flush=True))
        with _nested_lock():
            ran = host.run(argv, cwd=str(Path.cwd()), timeout=TIMEOUT_S[options.quick], stall=Stall(log, 1800.0))
        if not out.exists():  # with a JSON, failed steps are recorded in it
            tail = ran.stderr.strip().splitlines()[-1:] or ["no output"]
            raise VmctlError(f"nested host: `vmctl compare` exited with {ran.exit_code}: {tail[0][:300]}")
        return SuiteRun.from_dict(json.loads(out.read_text()))
    finally:
        shutil.rmtree(exchange, ignore_errors=True)
