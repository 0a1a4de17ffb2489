"""pagecache: every instance reads the same base files; what each extra reader costs the host.

Instances are started first and left to settle; then each reads the files (BENCH_DATA_DIR of
the bench image). The cost of the reads is counted where it lands, not from host-wide free
memory (the machine is shared; other jobs move that by hundreds of MiB):
- the host page cache of the files behind the shared data (the tree's files for native and
  container, Docker's copy in its image layer, a VM's base disk image): fincore(1), before
  and after;
- plus the growth of the instances' PSS (a VM's guest page cache is guest RAM, i.e. the VMM's
  memory; a container's reads leave its processes' memory as it was).
Containers share one page cache of the lower layer; each VM pays again in its own RAM.

VM levers measured here:
- `memory_merge` (guest RAM MADV_MERGEABLE, merged by the host's KSM): after the reads KSM
  runs until its merge count settles, and the PSS is read again (`vm+ksm`);
- a shared read-only base (`vm+dax`): the image's raw ext4 mapped into every guest as
  virtio-pmem and mounted `-o ro,dax`; the guests read the files from that mount, i.e. from
  the host's page cache of the one ext4 file, and not into their own page cache. The VMMs map
  that file, so the part of their PSS that is the file's page cache is not counted twice.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..images.rootfs import BENCH_DATA_DIR, BENCH_DATA_FILES, BENCH_DATA_MIB
from .columns.base import DAX_MOUNT, Instance, InstanceSpec, Runner, check_ok
from .fleet import Fleet
from .meminfo import drop_caches, mapped_pss, pss, resident_bytes, slope
from .model import Series, SuiteRun

MIB = 1 << 20
KSM = Path("/sys/kernel/mm/ksm")
KSM_WAIT_S = 300.0


def read_script(quick: bool, root: str = "") -> str:
    files = 1 if quick else BENCH_DATA_FILES
    names = " ".join(f"{root}/{BENCH_DATA_DIR}/shared-{i}.bin" for i in range(files))
    return f"cat {names} > /dev/null"


def dax_mount_script() -> str:
    """Mount the pmem base where /init did not already (images older than vmctl.pmem), and
    fail unless the mount is DAX: a silent fallback to the page cache would measure nothing."""
    m = DAX_MOUNT
    return (f"B=/bin/busybox; $B grep -q ' {m} ' /proc/mounts || {{ $B mkdir -p {m} && "
            f"$B mount -t ext4 -o ro,dax /dev/pmem0 {m}; }} && $B grep ' {m} ' /proc/mounts | $B grep -q dax")


def data_mib(quick: bool) -> int:
    return BENCH_DATA_MIB // BENCH_DATA_FILES if quick else BENCH_DATA_MIB


def _pss(instances: list[Instance], backing: list[Path]) -> int:
    """The instances' PSS without their mappings of the backing files (a DAX base): those
    pages are the files' page cache, already counted by fincore."""
    pids = [p for i in instances for p in i.host_pids()]
    return pss(pids) - mapped_pss(pids, backing)


def run_pagecache(run: SuiteRun, column_key: str, column: Runner, fleet: Fleet, counts: list[int],
                  spec: InstanceSpec, quick: bool, say, merge: bool = False) -> None:
    label = f"{column_key}+ksm" if merge else f"{column_key}+dax" if spec.dax_base else column_key
    if spec.dax_base:
        from .columns.backend import BackendColumn

        assert isinstance(column, BackendColumn), "a DAX base is a VM column's"
        backing, root = [column.base_ext4()], DAX_MOUNT
    else:
        backing, root = column.backing_files(BENCH_DATA_DIR), ""
    costs: list[float] = []
    merged_costs: list[float] = []
    for count in counts:
        what = " (memory_merge)" if merge else " (DAX base)" if spec.dax_base else ""
        say(f"pagecache{what}: {count} instance{'s' if count > 1 else ''}")
        instances, _ = fleet.start_many(column, spec, count)
        try:
            if spec.dax_base:
                for instance in instances:
                    check_ok(f"mount the DAX base at {DAX_MOUNT}", instance.run(dax_mount_script()))
            time.sleep(2.0)
            drop_caches()
            cache_before, pss_before = resident_bytes(backing), _pss(instances, backing)
            for instance in instances:
                check_ok("read the shared files", instance.run(read_script(quick, root)))
            cache = resident_bytes(backing) - cache_before
            costs.append((cache + _pss(instances, backing) - pss_before) / MIB)
            run.add("pagecache_host_cache_mib", label, cache / MIB, instances=count)
            if merge:
                sharing = _ksm_settle(say)
                merged_costs.append((resident_bytes(backing) - cache_before + _pss(instances, backing) - pss_before)
                                    / MIB)
                run.add("pagecache_ksm_merged_mib", label, sharing * 4096 / MIB, instances=count)
        finally:
            fleet.remove(instances)
            if merge:
                ksm_stop()
    run.series.append(Series("pagecache", label, "read_cost_mib", list(counts), costs))
    marginal = slope(counts, costs)
    run.add("pagecache_first_reader_mib", label, costs[0])
    run.add("pagecache_extra_reader_mib", label, marginal if marginal is not None else costs[0])
    if merge:
        run.series.append(Series("pagecache", f"{label} after KSM", "read_cost_mib", list(counts), merged_costs))
        marginal = slope(counts, merged_costs)
        run.add("pagecache_extra_reader_merged_mib", label, marginal if marginal is not None else merged_costs[0])
    note = f"pagecache: each instance read the same {data_mib(run.quick)} MiB of base files."
    if note not in run.notes:
        run.notes.append(note)


KSM_TOLERANCE_PAGES = 256  # 1 MiB
KSM_TOLERANCE_SHARE = 0.01


def ksm_settled(previous: int, current: int) -> bool:
    """pages_sharing moved by at most 1 MiB or 1 % since the last look. Running guests keep
    writing to their RAM (timers, the agent), so KSM unmerges and remerges a few pages all
    the time and the count rarely repeats exactly: an exact match waited out KSM_WAIT_S."""
    if previous <= 0 or current <= 0:
        return False
    return abs(current - previous) <= max(KSM_TOLERANCE_PAGES, KSM_TOLERANCE_SHARE * previous)


def _ksm_settle(say) -> int:
    """Run KSM fast until pages_sharing stops growing (ksm_settled three times in a row);
    returns pages_sharing."""
    (KSM / "pages_to_scan").write_text("20000\n")
    (KSM / "sleep_millisecs").write_text("0\n")
    (KSM / "run").write_text("1\n")
    deadline = time.monotonic() + KSM_WAIT_S
    last, stable = -1, 0
    while time.monotonic() < deadline and stable < 3:
        time.sleep(3.0)
        sharing = int((KSM / "pages_sharing").read_text())
        stable = stable + 1 if ksm_settled(last, sharing) else 0
        last = sharing
        say(f"KSM: {sharing * 4096 / MIB:.0f} MiB merged")
    if stable < 3:
        say(f"KSM: still changing after {KSM_WAIT_S:g} s; taking {last * 4096 / MIB:.0f} MiB")
    return max(last, 0)


def ksm_available() -> bool:
    return (KSM / "run").exists()


def ksm_stop() -> None:
    """Unmerge and stop (run=2): KSM is off by default and stays so after the run."""
    if ksm_available():
        (KSM / "run").write_text("2\n")
