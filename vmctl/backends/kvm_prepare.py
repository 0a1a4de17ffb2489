"""Turn a machine spec into what the native VMM process runs: images, overlays, keys, cmdline.

Runs in the `vmctl` command (not in the VMM), so a missing image or a disk that cannot be
made is an error on the user's terminal, before any process starts. Everything it creates
lives in the machine's state folder (disks/, ssh/), so deleting the folder releases it.
"""

from __future__ import annotations

from pathlib import Path

from ..disk.qcow2.create import create, create_overlay
from ..errors import VmctlError
from ..guest_contract import AGENT_CMDLINE, DEFAULT_CMDLINE, GUEST_AGENT, ROOT_CMDLINE, InitArgs, boot_script, reference_images
from ..plans import DiskPlan, ForwardPlan, KvmPlan, MountPlan, NetworkPlan, PmemPlan, SshAccess
from ..spec.model import MachineSpec
from ..ssh import generate_key


def machine_keys(spec: MachineSpec, folder: Path) -> tuple[str | None, list[str]]:
    """(private key path, authorized_keys lines): a key made for the machine when it has a
    network (in `folder`/ssh), plus the spec's own `ssh.authorized_key` (a line or a file)."""
    keys: list[str] = []
    private_key = None
    if spec.network.mode != "none":
        pair = generate_key(folder / "ssh", f"vmctl-{spec.name}")
        private_key = str(pair.private)
        keys.append(pair.public)
    if spec.ssh.authorized_key:
        text = spec.ssh.authorized_key
        keys.append(text if text.startswith(("ssh-", "ecdsa-", "sk-")) else Path(text).read_text().strip())
    return private_key, keys


def oci_boot(spec: MachineSpec, folder: Path) -> tuple[Path, Path, list[DiskPlan], list[str], str]:
    """`image: oci:…` as a VM (vmctl/oci/vm.py): (kernel, first-stage initramfs, disks: one
    read-only ext4 per layer then this machine's qcow2 upper, cmdline words, vmctl.cmd script).
    Records the layers in the folder so `vmctl image rm` keeps them while the machine exists."""
    kernel = spec.kernel or reference_images("busybox").kernel
    layers, upper_base, initrd, words, script = oci_parts(spec, folder)
    (folder / "disks").mkdir(parents=True, exist_ok=True)
    upper = folder / "disks" / "upper.qcow2"
    create_overlay(str(upper_base), str(upper), absolute=True, durable=False)
    disks = [DiskPlan(str(path), read_only=True, created=False) for path in layers]
    disks.append(DiskPlan(str(upper), read_only=False, created=True))
    return kernel, initrd, disks, words, script


def oci_parts(spec: MachineSpec, folder: Path | None) -> tuple[list[Path], Path, Path, list[str], str]:
    """(layer disks bottom first, blank upper base, first-stage initramfs, cmdline words,
    vmctl.cmd script) of an OCI image; with `folder`, the machine records the layers it uses."""
    import json

    from ..oci import vm
    from ..oci.runconfig import open_image, process
    from ..oci.store import USES_FILE, ImageStore

    store = ImageStore()
    image = open_image(spec.image, store)
    vm.check_layers(image)
    proc = process(image, spec.command, spec.environment)
    if folder is not None:
        (folder / USES_FILE).write_text(json.dumps({"image": image.ref, "diff_ids": image.diff_ids}))
    with store.locked():
        layers = [vm.layer_disk(store, diff_id) for diff_id in image.diff_ids]
        upper_base = vm.upper_base(store)
        initrd = vm.initramfs(store)
    return layers, upper_base, initrd, [f"vmctl.layers={len(layers)}"], vm.guest_script(image, proc, GUEST_AGENT)


def prepare(spec: MachineSpec, folder: Path) -> KvmPlan:
    """Create the machine's disks and key in `folder`; the plan the VMM process runs."""
    from ..net.ports import check_forwards
    from ..oci.runconfig import is_oci

    check_forwards(spec.source, spec.network.forwards)
    kernel, initrd, root_disk = spec.kernel, spec.initrd, None
    oci_disks: list[DiskPlan] = []
    oci_words: list[str] = []
    oci_script = None
    if is_oci(spec.image):
        kernel, initrd, oci_disks, oci_words, oci_script = oci_boot(spec, folder)
    if kernel is None:
        images = reference_images(spec.image)
        kernel, root_disk = images.kernel, images.root_disk
        initrd = initrd or images.initrd
    disks_dir = folder / "disks"
    disks: list[DiskPlan] = list(oci_disks)
    if root_disk is not None:
        disks_dir.mkdir(parents=True, exist_ok=True)
        overlay = disks_dir / "root.qcow2"
        create_overlay(str(root_disk), str(overlay), absolute=True, durable=False)
        disks.append(DiskPlan(str(overlay), read_only=False, created=True))
    for index, disk in enumerate(spec.disks):
        own = disks_dir / f"disk{index}.qcow2"
        try:
            if disk.image is None:
                disks_dir.mkdir(parents=True, exist_ok=True)
                create(str(own), disk.size or 0, durable=False)
            elif disk.overlay and not disk.read_only:
                disks_dir.mkdir(parents=True, exist_ok=True)
                create_overlay(str(disk.image), str(own), absolute=True, size=disk.size, durable=False)
            else:  # read-only, or written in place on request
                disks.append(DiskPlan(str(disk.image), read_only=disk.read_only, created=False))
                continue
        except VmctlError as error:
            raise VmctlError(f"{spec.source}: disks[{index}]: {error}") from None
        disks.append(DiskPlan(str(own), read_only=disk.read_only, created=True))

    private_key, keys = machine_keys(spec, folder)

    # Every machine also mounts its private transfer folder (vmctl cp without SSH).
    from ..guest_contract import XFER_DIR, XFER_GUEST, XFER_TAG

    xfer = folder / XFER_DIR
    xfer.mkdir(mode=0o700, exist_ok=True)
    mounts = tuple(MountPlan(str(m.host), m.guest, m.tag, m.read_only, m.cache) for m in spec.mounts)
    mounts += (MountPlan(str(xfer), XFER_GUEST, XFER_TAG, False),)
    script = oci_script or boot_script(spec.command, spec.environment, spec.ssh.user)
    words = InitArgs(hostname=spec.name, sshkey="\n".join(keys) if keys else None, cmd=script,
                     mounts=[("virtiofs", m.tag, m.guest, m.read_only) for m in mounts],
                     pmem=[p.guest for p in spec.pmem]).words()
    cmdline = " ".join([spec.cmdline or DEFAULT_CMDLINE, AGENT_CMDLINE, *([ROOT_CMDLINE] if root_disk else []),
                        *oci_words, *words])
    return KvmPlan(
        cpus=spec.cpus, memory=spec.memory, memory_merge=spec.memory_merge, image=spec.image,
        kernel=str(kernel), initrd=str(initrd) if initrd else None, cmdline=cmdline,
        command=tuple(spec.command), environment=dict(spec.environment), disks=tuple(disks), mounts=mounts,
        pmem=tuple(PmemPlan(str(p.image), p.guest) for p in spec.pmem),
        network=NetworkPlan(spec.network.mode, spec.network.mac,
                            tuple(ForwardPlan(f.host_port, f.guest_port, f.protocol) for f in spec.network.forwards)),
        ssh=SshAccess(spec.ssh.user, private_key), ephemeral=spec.ephemeral,
    )
