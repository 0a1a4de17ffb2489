"""container, vm and qemu: instances run by one of vmctl's backends, through its methods only
(start, wait_ready, exec, usage, remove) on a state store of the run's own."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ...errors import VmctlError
from .base import DAX_MOUNT, ColumnUnavailable, InstanceSpec, Output

BACKEND_OF = {"container": "container", "vm": "kvm", "qemu": "libvirt"}
READY_TIMEOUT = {"container": 60.0, "vm": 600.0, "qemu": 600.0}


class BackendInstance:
    def __init__(self, column: "BackendColumn", spec, record) -> None:
        self.column = column
        self.spec = spec
        self.record = record
        self.name = spec.name

    @property
    def address(self) -> str | None:
        """Read when needed: a VMM writes network.json once it has set up the TAP, which may
        be after `start` returned (under TCG in the nested host it was)."""
        network = self.column.store.network(self.name)
        return network["guest_ip"] if network else None

    def run(self, script: str, timeout: float = 600.0) -> Output:
        result = self.column.backend.exec(self.column.store, self.record, ["/bin/sh", "-c", script], timeout)
        return Output(result.exit_code, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace"))

    def host_pids(self) -> list[int]:
        return list(self.column.backend.usage(self.column.store, self.record).pids)

    def disk_bytes(self) -> int:
        return self.column.backend.usage(self.column.store, self.record).disk_bytes

    def remove(self) -> None:
        if self.record is None:
            return
        with self.column.store.locked():
            self.column.backend.remove(self.column.store, self.record)
        self.record = None


class BackendColumn:
    def __init__(self, name: str, image: str, work: Path) -> None:
        from ...backends import get_backend
        from ...state import StateStore

        self.name = name
        self.image = image
        self.backend_name = BACKEND_OF[name]
        _check(name, image)
        self.daemons = _nested_libvirtd() if name == "qemu" else None
        self.backend = get_backend(self.backend_name)
        self.state = work / f"state-{name}"
        self.state.mkdir(parents=True, exist_ok=True)
        self.store = StateStore(self.state)
        self.label = {"container": "container (vmctl container backend)", "vm": "VM (vmctl's VMM, kvm backend)",
                      "qemu": "VM (QEMU/KVM via libvirt)"}[name]

    def start(self, spec: InstanceSpec, index: int) -> BackendInstance:
        from ...spec.model import MachineSpec, NetworkSpec, PmemSpec

        pmem = (PmemSpec(self.base_ext4(), DAX_MOUNT),) if spec.dax_base else ()
        machine = MachineSpec(
            name=f"suite-{self.name}-{index}-{os.getpid()}", backend=self.backend_name, cpus=spec.cpus,
            memory=spec.memory_mib << 20, image=spec.image,
            network=NetworkSpec(mode="isolated" if spec.network else "none"),
            **({"memory_merge": True} if spec.memory_merge else {}),  # type: ignore[arg-type]
            pmem=pmem,
        )
        with self.store.locked():
            record = self.backend.start(self.store, machine, None)
        instance = BackendInstance(self, machine, record)
        try:
            self.backend.wait_ready(self.store, record, READY_TIMEOUT[self.name])
            if spec.network:
                _wait_exec(instance)
        except BaseException:
            instance.remove()
            raise
        return instance

    def base_ext4(self) -> Path:
        """The image's raw ext4 (what the qcow2 root disk was converted from): the shared
        read-only base a `dax_base` VM maps as virtio-pmem."""
        from ...disk.ext4_super import check_dax_base
        from ...images.layout import locate

        path = locate(self.image).rootfs_ext4
        try:
            check_dax_base(path)
        except VmctlError as error:
            raise ColumnUnavailable(f"{self.name}: the {self.image} image's ext4 cannot be a DAX base: {error}") from None
        return path

    def backing_files(self, relative: str) -> list[Path]:
        if self.name == "container":
            from ...backends.container.overlay_root import base_tree

            return sorted((base_tree(self.image) / relative).glob("*"))
        from ...guest_contract import reference_images

        disk = reference_images(self.image).root_disk
        return [disk] if disk else []

    def close(self) -> None:
        shutil.rmtree(self.state, ignore_errors=True)
        if self.daemons is not None:
            self.daemons.stop()


def _nested_libvirtd():
    """Inside the nested host (a throwaway L1 without a service manager) the qemu column starts
    libvirtd and virtlogd itself, as the docker column starts its own dockerd, and stops them
    on close. Elsewhere a missing libvirtd stays the backend's one-line error."""
    if os.environ.get("VMCTL_NESTED") != "1":
        return None
    from ...backends.libvirt.daemons import missing_reason, start_here

    reason = missing_reason()
    if reason:
        raise ColumnUnavailable(f"qemu: {reason}")
    return start_here()


def _wait_exec(instance: BackendInstance, attempts: int = 60) -> None:
    """A VM on the network is reached over SSH: wait until a command goes through."""
    import time

    last = ""
    for _ in range(attempts):
        try:
            if instance.run("true", timeout=30).exit_code == 0:
                return
        except VmctlError as error:
            last = str(error)
        time.sleep(1)
    raise VmctlError(f"{instance.name}: ready, but commands do not run: {last}")


def _check(name: str, image: str) -> None:
    """One line saying what is missing, before anything is started."""
    if os.geteuid() != 0:
        raise ColumnUnavailable(f"{name}: needs root")
    if name == "container":
        from ...backends.container.overlay_root import base_tree
        from ...backends.container.runtime import choose

        choose()
        base_tree(image)
        return
    from ...guest_contract import reference_images
    from ...host_probe import check_host

    reference_images(image)
    report = check_host()
    if not report.boots_linux and os.environ.get("VMCTL_NESTED") != "1":
        raise ColumnUnavailable(f"{name}: this host's /dev/kvm ({report.kvm_module}) cannot boot Linux")
    if name == "qemu":
        if shutil.which("virsh") is None:
            raise ColumnUnavailable("qemu: libvirt is not installed (scripts/libvirt-setup)")
        try:
            import libvirt  # noqa: F401
        except ImportError:
            raise ColumnUnavailable("qemu: libvirt-python is missing (pip install '.[libvirt]')") from None
