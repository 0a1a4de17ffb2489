"""The L1 initramfs: static busybox, the needed modules, /init and a per-run plan.

/init loads the modules, mounts the host's root (9p, read-only) under an in-memory
overlay so L1 sees exactly the host's files and may write anywhere (writes vanish at
power-off), mounts the writable shares at their host paths, checks /dev/kvm, runs
$IO_DIR/command.sh chrooted into that root with stdout/stderr going to files in the I/O
share, prints the exit code on the console and powers off.

The archive is written with the system `cpio` (newc format) for now; switch to
vmctl.images.cpio once that module exists.
"""

from __future__ import annotations

import shlex
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import VmctlError
from .l1_kernel import L1Kernel

# Console markers the host watches for (vmctl.nested.l1_host parses them).
READY_MARKER = "VMCTL-NESTED-READY"
EXIT_MARKER = "VMCTL-NESTED-EXIT"
FAILED_MARKER = "VMCTL-NESTED-SETUP-FAILED"
ROOT_TAG = "hostroot"
# Host directories L1 sees as empty tmpfs (transient host state; see INIT_SCRIPT).
HIDDEN_DIRS = (Path("/tmp"), Path("/var/tmp"), Path("/run"))

INIT_SCRIPT = r"""#!/bin/busybox sh
# /init of the vmctl nested host (L1); written by vmctl/nested/initramfs.py.
/bin/busybox mkdir -p /proc /sys /dev /lower /rw /newroot
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
. /plan.sh

fail() {
    echo "@FAILED@ $*"
    poweroff -f
}

for name in $(cat /modules/load-order); do
    insmod "/modules/$name.ko" || fail "insmod $name failed"
done
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm_amd (no svm in the L1 CPU?)"

NINEP="trans=virtio,version=9p2000.L,msize=$MSIZE"
mount -t 9p -o "ro,cache=loose,$NINEP" @ROOT@ /lower || fail "cannot mount the host root (9p)"
mount -t tmpfs -o mode=0755 upper /rw && mkdir /rw/upper /rw/work || fail "tmpfs"
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "cannot mount the overlay root"
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
# What udev/systemd would have made: /dev/fd and the std streams (bash's <(…), `cat /dev/stdin`).
ln -sfn /proc/self/fd $R/dev/fd && ln -sf /proc/self/fd/0 $R/dev/stdin && \
    ln -sf /proc/self/fd/1 $R/dev/stdout && ln -sf /proc/self/fd/2 $R/dev/stderr || fail "cannot link /dev/fd"
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
# cgroup v2, every controller delegated to child groups (what systemd sets up): the container
# backend puts each container's memory and cpu limits in /sys/fs/cgroup/vmctl/<id>.
mount -t cgroup2 -o nsdelegate cgroup2 $R/sys/fs/cgroup || fail "cannot mount cgroup2"
for controller in $(cat $R/sys/fs/cgroup/cgroup.controllers); do
    echo "+$controller" >$R/sys/fs/cgroup/cgroup.subtree_control || echo "vmctl: cgroup controller $controller not enabled"
done
mount -t tmpfs -o mode=1777 shm $R/dev/shm
# Hide the host's transient state: L1 gets empty /tmp, /var/tmp and /run.
mount -t tmpfs -o mode=1777 tmp $R/tmp
mount -t tmpfs -o mode=1777 vartmp $R/var/tmp
mount -t tmpfs -o mode=0755 run $R/run
# (HIDDEN_DIRS in initramfs.py lists these three; keep them in step.)
for tag in $SHARE_TAGS; do
    eval "path=\$SHARE_PATH_$tag"
    mkdir -p "$R$path" && mount -t 9p -o "$NINEP" "$tag" "$R$path" || fail "cannot mount share $path"
done
hostname vmctl-l1
# Loopback up: port forwards listen on 127.0.0.1 (vmctl/vmm/forward.py).
ip link set lo up || fail "cannot bring up lo"
# Guests' RAM is MADV_HUGEPAGE: never stall a fault on synchronous compaction under emulation.
echo defer+madvise >/sys/kernel/mm/transparent_hugepage/defrag 2>/dev/null || true
# KVM's static keys stay on for L1's life: flipping them (text_poke_bp) can livelock TCG
# (vmctl/nested/pin.py says how). Wait until its VMs exist, so no command races the flip.
chroot $R "$PIN_PYTHON" -m vmctl.nested.pin /run/vmctl-pin </dev/null >/dev/console 2>&1 &
for i in $(seq 300); do [ -f $R/run/vmctl-pin ] && break; sleep 0.1; done
[ -f $R/run/vmctl-pin ] || echo "vmctl: KVM static keys not pinned (see above); L1 may wedge"

echo "@READY@ $(cut -d' ' -f1 /proc/uptime)"
chroot $R /bin/sh "$IO_DIR/command.sh" </dev/null >"$R$IO_DIR/stdout" 2>"$R$IO_DIR/stderr"
code=$?
echo "$code" >"$R$IO_DIR/exit-code"
sync
echo "@EXIT@ $code $(cut -d' ' -f1 /proc/uptime)"
poweroff -f
"""


@dataclass(frozen=True)
class Share:
    """A host directory L1 mounts read-write (9p) at the same path."""

    tag: str
    path: Path


def init_script() -> str:
    return (
        INIT_SCRIPT.replace("@FAILED@", FAILED_MARKER)
        .replace("@READY@", READY_MARKER)
        .replace("@EXIT@", EXIT_MARKER)
        .replace("@ROOT@", ROOT_TAG)
    )


def plan_script(io_dir: Path, shares: list[Share], msize: int) -> str:
    # The pin runs with our interpreter (same path inside L1), which has vmctl importable.
    lines = [f"IO_DIR={shlex.quote(str(io_dir))}", f"MSIZE={msize}", f"PIN_PYTHON={shlex.quote(sys.executable)}"]
    lines.append("SHARE_TAGS=" + shlex.quote(" ".join(share.tag for share in shares)))
    lines += [f"SHARE_PATH_{share.tag}={shlex.quote(str(share.path))}" for share in shares]
    return "\n".join(lines) + "\n"


def find_busybox() -> Path:
    """A statically linked busybox (Debian: busybox-static), or a VmctlError saying so."""
    found = shutil.which("busybox")
    if not found:
        raise VmctlError("busybox not found: install busybox-static")
    path = Path(found).resolve()
    if _has_interpreter(path.read_bytes()):
        raise VmctlError(f"{path} is dynamically linked: install busybox-static")
    return path


def _has_interpreter(elf: bytes) -> bool:
    """True when an ELF64 has a PT_INTERP program header (i.e. is not static)."""
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return any(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def build(target: Path, kernel: L1Kernel, plan: str) -> Path:
    """Write the initramfs for one run to `target` (an uncompressed newc cpio)."""
    if not shutil.which("cpio"):
        raise VmctlError("cpio not found: install cpio")
    staging = target.with_name(target.name + ".d")
    (staging / "bin").mkdir(parents=True)
    shutil.copyfile(find_busybox(), staging / "bin/busybox")
    (staging / "bin/busybox").chmod(0o755)
    shutil.copytree(kernel.modules, staging / "modules")
    shutil.copyfile(kernel.folder / "load-order", staging / "modules/load-order")
    (staging / "init").write_text(init_script())
    (staging / "init").chmod(0o755)
    (staging / "plan.sh").write_text(plan)
    names = sorted(str(p.relative_to(staging)) for p in staging.rglob("*"))
    with target.open("wb") as out:
        result = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
            input="\n".join(names) + "\n", stdout=out, stderr=subprocess.PIPE,
            cwd=staging, text=True, check=False,
        )
    shutil.rmtree(staging)
    if result.returncode != 0:
        raise VmctlError(f"cpio failed: {result.stderr.strip()}")
    return target
