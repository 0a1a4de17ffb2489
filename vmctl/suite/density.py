"""density: N instances of a column started at once on the same base; what each costs.

For each N: seconds until all N are ready, host MemAvailable drop, sum of the instances'
PSS, disk their overlays added. The marginal cost of one more instance is the slope over N.
"""

from __future__ import annotations

import time

from .columns.base import InstanceSpec, Runner
from .fleet import Fleet
from .meminfo import meminfo, pss, slope
from .model import Series, SuiteRun

SETTLE_S = 2.0  # let the instances' start-up allocations land before reading meminfo
MIB = 1 << 20


def run_density(run: SuiteRun, column_key: str, column: Runner, fleet: Fleet, counts: list[int],
                spec: InstanceSpec, say) -> None:
    curves: dict[str, list[float]] = {"ready_s": [], "memavailable_drop_mib": [], "pss_mib": [], "disk_mib": []}
    for count in counts:
        say(f"density: {count} instance{'s' if count > 1 else ''}")
        before = meminfo()["MemAvailable"]
        instances, ready = fleet.start_many(column, spec, count)
        try:
            time.sleep(SETTLE_S)
            after = meminfo()["MemAvailable"]
            curves["ready_s"].append(ready)
            curves["memavailable_drop_mib"].append((before - after) / MIB)
            curves["pss_mib"].append(pss([p for i in instances for p in i.host_pids()]) / MIB)
            curves["disk_mib"].append(sum(i.disk_bytes() for i in instances) / MIB)
        finally:
            fleet.remove(instances)
    for metric, values in curves.items():
        run.series.append(Series("density", column_key, metric, list(counts), values))
    for metric, row in (("memavailable_drop_mib", "density_memavailable_per_instance_mib"),
                        ("pss_mib", "density_pss_per_instance_mib"), ("disk_mib", "density_disk_per_instance_mib")):
        marginal = slope(counts, curves[metric])
        if marginal is None:  # one N only: the average cost instead
            marginal = curves[metric][-1] / counts[-1]
        run.add(row, column_key, marginal)
    run.add("density_ready_s", column_key, curves["ready_s"][-1], instances=counts[-1])
