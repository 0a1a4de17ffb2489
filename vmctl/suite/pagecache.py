"""pagecache: every instance reads the same base files; what each extra reader costs the host.

Instances are started first and left to settle; then all read the files (BENCH_DATA_DIR of
the bench image) and the host's used memory (MemTotal - MemFree: the page cache counts, it
is exactly what is or is not shared) is compared before and after. Containers share one
page cache of the lower layer; each VM reads into its own guest page cache (guest RAM) on top
of the host's cache of the base image.

VM lever measured here: `memory_merge` (guest RAM MADV_MERGEABLE, merged by the host's KSM):
after the reads, KSM runs until its merge count settles and the cost is read again.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..images.rootfs import BENCH_DATA_DIR, BENCH_DATA_FILES, BENCH_DATA_MIB
from .columns.base import InstanceSpec, Runner, check_ok
from .fleet import Fleet
from .meminfo import drop_caches, meminfo, pss, slope
from .model import Series, SuiteRun

MIB = 1 << 20
KSM = Path("/sys/kernel/mm/ksm")
KSM_WAIT_S = 240.0


def read_script(quick: bool) -> str:
    files = 1 if quick else BENCH_DATA_FILES
    names = " ".join(f"/{BENCH_DATA_DIR}/shared-{i}.bin" for i in range(files))
    return f"cat {names} > /dev/null"


def data_mib(quick: bool) -> int:
    return BENCH_DATA_MIB // BENCH_DATA_FILES if quick else BENCH_DATA_MIB


def _used() -> int:
    info = meminfo()
    return info["MemTotal"] - info["MemFree"]


def run_pagecache(run: SuiteRun, column_key: str, column: Runner, fleet: Fleet, counts: list[int],
                  spec: InstanceSpec, quick: bool, say, merge: bool = False) -> None:
    label = f"{column_key}+ksm" if merge else column_key
    costs: list[float] = []
    merged_costs: list[float] = []
    for count in counts:
        say(f"pagecache{' (memory_merge)' if merge else ''}: {count} instance{'s' if count > 1 else ''}")
        drop_caches()
        instances, _ = fleet.start_many(column, spec, count)
        try:
            time.sleep(2.0)
            before = _used()
            for instance in instances:
                check_ok("read the shared files", instance.run(read_script(quick)))
            time.sleep(1.0)
            costs.append((_used() - before) / MIB)
            if merge:
                sharing = _ksm_settle(say)
                merged_costs.append((_used() - before) / MIB)
                run.add("pagecache_ksm_merged_mib", label, sharing * 4096 / MIB, instances=count)
            run.add("pagecache_pss_mib", label, pss([p for i in instances for p in i.host_pids()]) / MIB,
                    instances=count)
        finally:
            fleet.remove(instances)
    run.series.append(Series("pagecache", label, "read_cost_mib", list(counts), costs))
    marginal = slope(counts, costs)
    run.add("pagecache_first_reader_mib", label, costs[0])
    run.add("pagecache_extra_reader_mib", label, marginal if marginal is not None else costs[0])
    if merge:
        run.series.append(Series("pagecache", f"{label} after merge", "read_cost_mib", list(counts), merged_costs))
        marginal = slope(counts, merged_costs)
        run.add("pagecache_extra_reader_merged_mib", label, marginal if marginal is not None else merged_costs[0])
    run.notes.append(f"pagecache: each instance read {data_mib(quick)} MiB of the same base files.")


def _ksm_settle(say) -> int:
    """Run KSM fast until pages_sharing stops growing; returns pages_sharing."""
    (KSM / "pages_to_scan").write_text("20000\n")
    (KSM / "sleep_millisecs").write_text("0\n")
    (KSM / "run").write_text("1\n")
    deadline = time.monotonic() + KSM_WAIT_S
    last, stable = -1, 0
    while time.monotonic() < deadline and stable < 3:
        time.sleep(3.0)
        sharing = int((KSM / "pages_sharing").read_text())
        stable = stable + 1 if sharing == last and sharing > 0 else 0
        last = sharing
        say(f"KSM: {sharing * 4096 / MIB:.0f} MiB merged")
    return max(last, 0)


def ksm_available() -> bool:
    return (KSM / "run").exists()


def ksm_stop() -> None:
    """Unmerge and stop (run=2), as the host had it before (KSM is off by default)."""
    if ksm_available():
        (KSM / "run").write_text("2\n")
