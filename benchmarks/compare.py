"""The same workload as a container, as a VM and natively, from the same debian base tree.

Workload: write 8 MiB to a new file in the root filesystem, sync, checksum it (so each
instance adds to its own overlay: the container's overlayfs upper dir, the VM's qcow2
overlay). 256 MiB, 1 CPU, no network. Medians of --runs instances per kind of:
time to ready, time to run the command (through `vmctl exec`), host PSS per instance and
disk added per instance; see `vmctl compare --help` (vmctl/cli/compare.py does the work).

On a host whose /dev/kvm cannot boot Linux (kvm_pvm here) the VM side runs inside the nested
host: the output says so and the JSON records the host's KVM mode.

    sudo python benchmarks/compare.py [--runs 3]

Writes benchmarks/results/compare.json and prints the markdown table (docs/benchmarks-compare.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from publish import publish  # noqa: E402

SPEC = """machines:
  work:
    image: debian
    cpus: 1
    memory: 256M
    command: dd if=/dev/zero of=/root/blob bs=1M count=8 2>/dev/null && sync && md5sum /root/blob
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "compare.json")
    args = parser.parse_args()

    from vmctl.cli.compare import KINDS, compare, table
    from vmctl.spec import load_spec

    with tempfile.TemporaryDirectory(prefix="vmctl-bench-compare-") as work:
        spec_path = Path(work) / "compare.yaml"
        spec_path.write_text(SPEC)
        spec = load_spec(spec_path).machines[0]
        result = compare(spec, spec_path, args.runs, list(KINDS), args.timeout)
    result["workload"] = "write 8 MiB to /root/blob, sync, md5sum (debian base, 256 MiB, 1 CPU, no network)"
    publish(result, args.output, table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
