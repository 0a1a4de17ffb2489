"""Disk used by N containers and N VMs of two OCI images that share a base layer, with the
layer sharing of vmctl's image store vs without it (each image flattened on its own).

Images (built here, like the tests'): a base layer of busybox plus 64 MiB of incompressible
data, and one small top layer per image. For each image, N containers run (`vmctl up`,
backend container) and each writes 1 MiB to its root; N VMs of each image are prepared
(their disks made exactly as `vmctl up` makes them: the layer ext4 disks, the per-VM qcow2
upper) — booting them needs hardware KVM, which this host lacks, and does not change what
the shared files cost. Bytes are allocated bytes (st_blocks), hard links counted once.

    sudo .venv/bin/python benchmarks/oci_disk.py [--machines 4]

Writes benchmarks/results/oci_disk.json and prints the markdown table of docs/images.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 1 << 20


def du(path: Path) -> int:
    from vmctl.proc import allocated_bytes as disk_usage

    return disk_usage(path) if path.is_dir() else (path.stat().st_blocks * 512 if path.exists() else 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--machines", type=int, default=4, help="containers and VMs per image (default 4)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="oci-disk-"))
    os.environ.update(VMCTL_OCI_DIR=str(work / "oci"), VMCTL_STATE_DIR=str(work / "state"))
    from vmctl.oci.samples import base_layer
    from vmctl.oci.store import ImageStore
    from vmctl.oci.write import Layer, write_layout

    data = random.Random(0).randbytes(64 * MIB)
    base = base_layer().file("data.bin", data).tar()
    write_layout(work / "image-a", [base, Layer().file("a.txt", "a" * 4096).tar()], cmd=["/bin/sh"])
    write_layout(work / "image-b", [base, Layer().file("b.txt", "b" * 4096).tar()], cmd=["/bin/sh"])
    vmctl = [sys.executable, "-m", "vmctl"]
    for name in ("image-a", "image-b"):
        subprocess.run([*vmctl, "image", "import", str(work / name)], check=True, capture_output=True)
    store = ImageStore()
    names, result = [], {}
    try:
        spec = work / "machines.yaml"
        lines = ["machines:"]
        for image in ("image-a", "image-b"):
            for i in range(args.machines):
                name = f"c-{image[-1]}{i}"
                names.append(name)
                lines += [f"  {name}:", "    backend: container", f"    image: oci:{image}",
                          "    command: head -c 1048576 /data.bin > /root/written; sleep 600"]
        spec.write_text("\n".join(lines) + "\n")
        subprocess.run([*vmctl, "up", str(spec)], check=True, capture_output=True)
        import time
        time.sleep(2)
        uppers = [du(work / "state/machines" / name / "rootfs/upper") for name in names]

        from vmctl.backends.kvm_prepare import prepare
        from vmctl.spec import parse_spec

        vm_dirs = []
        for image in ("image-a", "image-b"):
            for i in range(args.machines):
                folder = work / "vms" / f"v-{image[-1]}{i}"
                folder.mkdir(parents=True)
                prepare(parse_spec({"name": folder.name, "image": f"oci:{image}"}).machines[0], folder)
                vm_dirs.append(folder)
        vm_uppers = [du(folder / "disks") for folder in vm_dirs]

        blobs = du(store.root / "blobs")
        layer_dirs = sum(du(p) for p in (store.root / "layers").iterdir() if p.is_dir())
        layer_disks = sum(du(p) for p in (store.root / "layers").glob("*.ext4"))
        upper_base = sum(du(p) for p in store.root.glob("upper-*.ext4"))

        # without layer sharing: each image flattened on its own (a tree for containers, an ext4 for VMs)
        flat_trees, flat_disks = 0, 0
        from vmctl.images.ext4 import image_size_mib
        from vmctl.images.rootfs import tree_size
        from vmctl.oci.vm import _run

        for image in ("image-a", "image-b"):
            tree = work / f"flat-{image}"
            record = store.get(image)
            lowers = ":".join(str(p) for p in store.lowers(record))
            mnt = work / f"mnt-{image}"
            mnt.mkdir()
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lowers}", str(mnt)], check=True)
            try:
                subprocess.run(["cp", "-a", f"{mnt}/.", str(tree)], check=True)
            finally:
                subprocess.run(["umount", str(mnt)], check=True)
            flat_trees += du(tree)
            disk = work / f"flat-{image}.ext4"
            with open(disk, "wb") as handle:
                handle.truncate(image_size_mib(tree_size(tree), 8) * MIB)
            _run(["mkfs.ext4", "-F", "-q", "-O", "^has_journal", "-d", str(tree), str(disk)], "flat")
            flat_disks += du(disk)
        n = args.machines
        shared_total = blobs + layer_dirs + layer_disks + upper_base + sum(uppers) + sum(vm_uppers)
        unshared_total = blobs + flat_trees + flat_disks + upper_base + sum(uppers) + sum(vm_uppers)
        result = {
            "machines_per_image": n, "blobs": blobs, "layer_dirs": layer_dirs, "layer_disks": layer_disks,
            "upper_base": upper_base, "container_upper_each": max(uppers), "vm_upper_each": max(vm_uppers),
            "flat_trees": flat_trees, "flat_disks": flat_disks,
            "total_shared": shared_total, "total_unshared": unshared_total,
            "ratio_unshared_over_shared": unshared_total / shared_total,
            "full_copy_per_machine": n * (flat_trees + flat_disks) + blobs,
        }
    finally:
        subprocess.run([*vmctl, "rm", *names], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "oci_disk.json").write_text(json.dumps(result, indent=2))
    m = lambda b: f"{b / MIB:.1f} MiB"  # noqa: E731
    n = result["machines_per_image"]
    print(f"| what ({n} containers + {n} VMs per image, 2 images) | layers shared (vmctl) | each image flattened |")
    print("|---|---|---|")
    print(f"| imported blobs (compressed layers, configs) | {m(result['blobs'])} | {m(result['blobs'])} |")
    print(f"| container lowers: unpacked layers / flattened trees | {m(result['layer_dirs'])} | {m(result['flat_trees'])} |")
    print(f"| VM disks: one ext4 per layer / one ext4 per image | {m(result['layer_disks'])} | {m(result['flat_disks'])} |")
    print(f"| blank upper ext4 (VM qcow2 backing, once) | {m(result['upper_base'])} | {m(result['upper_base'])} |")
    print(f"| per container: upper after writing 1 MiB (x{2 * n}) | {m(result['container_upper_each'])} | same |")
    print(f"| per VM: qcow2 upper at creation (x{2 * n}) | {m(result['vm_upper_each'])} | same |")
    print(f"| **total** | **{m(result['total_shared'])}** | **{m(result['total_unshared'])}** "
          f"({result['ratio_unshared_over_shared']:.2f}x) |")
    print(f"| no copy-on-write at all (a full tree + disk per machine) | | {m(result['full_copy_per_machine'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
