"""An OCI image as a VM: one read-only ext4 disk per layer, stacked by overlayfs in the guest.

Why not one qcow2 per layer in a backing chain: a qcow2 overlay records *blocks*, and a layer
is a set of *file* changes. To get layer N as blocks, one would have to replay its changes
into a copy of layer N-1's file system (a loop or nbd mount, deletions for whiteouts), and
what that writes depends on ext4's allocator, journal, bitmaps and inode tables, i.e. on
the whole history below: the same layer on two different bases gives unrelated blocks, so
only images with identical *chains* could share anything, and every qcow2 of the chain
would carry ext4 metadata churn. Stacking file-level layers where containers stack them
(overlayfs) keeps one disk per layer, shared by every image and VM that has the layer:

    layers/<diff_id>.ext4   mkfs.ext4 -d of the unpacked layer: no journal, whiteouts (char
                            0:0) and opaque xattrs kept, so the guest's overlayfs reads it
                            exactly as the host's does for containers
    upper-<size>.ext4       one blank ext4 in the store; each VM writes to its own qcow2
                            overlay of it (disks/upper.qcow2 in the machine folder)
    boot/initramfs-<key>    busybox + a first-stage /init: mounts the layer disks read-only
                            and the upper, mounts the overlay, puts vmctl's /init (made to
                            use /.vmctl/busybox) in a tmpfs top layer, then switch_root
                            into the image's root, where that /init runs the image command
                            and reports VMCTL-READY / VMCTL-EXIT as for any vmctl guest.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from importlib import resources
from pathlib import Path

from ..errors import VmctlError
from .runconfig import OciImage, Process
from .store import ImageStore

MAX_LAYERS = 15  # virtio-mmio GSIs 5..23 hold 19 devices: layers + upper + net, rng, …
UPPER_SIZE_MIB = 4096  # sparse: a blank ext4 allocates a few MiB
GUEST_BUSYBOX = "/.vmctl/busybox"
GUEST_INIT = "/.vmctl/init"
BUSYBOX = Path("/bin/busybox")

STAGE1 = r"""#!/bin/busybox sh
# vmctl OCI first stage: stack the layer disks (vda.. read-only ext4, bottom first) and the
# upper disk (the next one) with overlayfs, then run vmctl's /init inside the image's root.
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t devtmpfs devtmpfs /dev 2>/dev/null
fail() { echo "vmctl-oci-init: $*"; echo "VMCTL-EXIT 125"; $B sync; $B reboot -f; }
N=
for word in $($B cat /proc/cmdline); do
    case "$word" in vmctl.layers=*) N=${word#vmctl.layers=} ;; esac
done
[ -n "$N" ] || fail "no vmctl.layers= on the command line"
letters=abcdefghijklmnopqrstuvwxyz
lower=
i=0
while [ "$i" -lt "$N" ]; do
    dev=/dev/vd$(echo $letters | $B cut -c$((i + 1)))
    $B mkdir -p /layers/$i
    $B mount -t ext4 -o ro,noload "$dev" /layers/$i || fail "cannot mount layer $i ($dev)"
    lower="/layers/$i${lower:+:$lower}"
    i=$((i + 1))
done
dev=/dev/vd$(echo $letters | $B cut -c$((N + 1)))
$B mkdir -p /upper /newroot /top
$B mount -t ext4 "$dev" /upper || fail "cannot mount the upper disk ($dev)"
$B mkdir -p /upper/upper /upper/work
$B mount -t tmpfs -o mode=0755 vmctl /top
$B mkdir -p /top/.vmctl
$B cp /bin/busybox /top/.vmctl/busybox
$B cp /stage2 /top/.vmctl/init
$B mount -t overlay overlay -o "lowerdir=/top:$lower,upperdir=/upper/upper,workdir=/upper/work" /newroot ||
    fail "cannot mount the overlay root"
$B umount /proc
$B umount /dev 2>/dev/null
exec $B switch_root /newroot /.vmctl/busybox sh /.vmctl/init
"""

# vmctl's /init, made to run from /.vmctl in an image that may have no busybox or shell
_STAGE2_EDITS = (
    ("BB=/bin/busybox", f"BB={GUEST_BUSYBOX}"),
    ('    /bin/sh -c "$(decode "$CMD")"', '    $BB sh -c "$(decode "$CMD")"'),
    ("$BB setsid $BB cttyhack /bin/sh -l", "$BB setsid $BB cttyhack $BB sh -l"),
)


def stage2_init() -> str:
    text = resources.files("vmctl.images").joinpath("data/init").read_text()
    for old, new in _STAGE2_EDITS:
        if old not in text:
            raise VmctlError(f"vmctl's /init changed: {old!r} is not in it (update vmctl/oci/vm.py)")
        text = text.replace(old, new)
    return text


def initramfs(store: ImageStore) -> Path:
    """The first-stage initramfs, built once per busybox and script version."""
    from ..images import cpio

    if not BUSYBOX.exists():
        raise VmctlError(f"{BUSYBOX} is missing: install busybox-static (it boots OCI images in VMs)")
    stage2 = stage2_init()
    key = hashlib.sha256(BUSYBOX.read_bytes() + STAGE1.encode() + stage2.encode()).hexdigest()[:16]
    out = store.root / "boot" / f"initramfs-{key}.cpio"
    if out.exists():
        return out
    entries = [cpio.directory(d) for d in ("bin", "dev", "proc", "layers", "upper", "newroot", "top")]
    entries += [cpio.CpioEntry("bin/busybox", 0o100755, source=BUSYBOX), cpio.symlink("bin/sh", "busybox"),
                cpio.file("init", STAGE1.encode(), 0o755), cpio.file("stage2", stage2.encode(), 0o755),
                cpio.char_device("dev/console", 5, 1, 0o600), cpio.char_device("dev/null", 1, 3, 0o666)]
    _atomic_build(out, lambda tmp: tmp.write_bytes(cpio.archive(entries)))
    return out


def layer_disk(store: ImageStore, diff_id: str) -> Path:
    """The layer as a read-only ext4 image (made on first use, shared afterwards)."""
    from ..images.ext4 import image_size_mib
    from ..images.rootfs import tree_size

    out = store.layer_disk(diff_id)
    if out.exists():
        return out
    tree = store.layer_dir(diff_id)
    size = image_size_mib(tree_size(tree), 8)
    fs_uuid = _uuid(diff_id)

    def build(tmp: Path) -> None:
        with open(tmp, "wb") as image:
            image.truncate(size << 20)
        _run(["mkfs.ext4", "-F", "-q", "-t", "ext4", "-b", "4096", "-m", "0", "-O", "^has_journal", "-L", "vmctl-layer",
              "-U", fs_uuid, "-E", f"hash_seed={fs_uuid},root_owner=0:0", "-d", str(tree), str(tmp)], diff_id)

    _atomic_build(out, build)
    return out


def upper_base(store: ImageStore) -> Path:
    out = store.root / f"upper-{UPPER_SIZE_MIB}.ext4"
    if out.exists():
        return out

    def build(tmp: Path) -> None:
        with open(tmp, "wb") as image:
            image.truncate(UPPER_SIZE_MIB << 20)
        _run(["mkfs.ext4", "-F", "-q", "-t", "ext4", "-b", "4096", "-m", "0", "-L", "vmctl-upper",
              "-E", "lazy_itable_init=1,lazy_journal_init=1", str(tmp)], "upper")

    _atomic_build(out, build)
    return out


def guest_script(image: OciImage, proc: Process, agent: str) -> str:
    """The `vmctl.cmd` script: the exec agent (on /.vmctl/busybox), the image's environment
    and working directory, then its command as the image's user."""
    agent = agent.replace("B=/bin/busybox", f"B={GUEST_BUSYBOX}").replace("/bin/sh $t.sh", "$B sh $t.sh")
    lines = [agent, "B=" + GUEST_BUSYBOX]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in proc.env.items()]
    lines.append(f"$B mkdir -p {shlex.quote(proc.cwd)} && cd {shlex.quote(proc.cwd)} || exit 126")
    argv = shlex.join(proc.args)
    if (proc.uid, proc.gid) != (0, 0):  # busybox's setpriv cannot change ids; start-stop-daemon can
        program = shlex.quote(proc.args[0])
        rest = shlex.join(proc.args[1:])
        lines.append(f"exec $B start-stop-daemon -S -p /.vmctl-no-pidfile -c {proc.uid}:{proc.gid} -x {program} -- {rest}")
    else:
        lines.append(f"exec {argv}")
    return "\n".join(lines)


def check_layers(image: OciImage) -> None:
    if len(image.lowers) > MAX_LAYERS:
        raise VmctlError(f"image {image.ref}: {len(image.lowers)} layers; a VM takes at most {MAX_LAYERS} "
                         f"(one disk each): squash the image")


def _uuid(diff_id: str) -> str:
    import uuid

    return str(uuid.UUID(hex=diff_id.split(":", 1)[1][:32]))


def _run(argv: list[str], what: str) -> None:
    import subprocess

    try:
        result = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise VmctlError(f"{argv[0]} is missing: install e2fsprogs") from None
    if result.returncode:
        raise VmctlError(f"{what}: {argv[0]} failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")


def _atomic_build(out: Path, build) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        build(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
