"""What every column provides to the suites: start an instance of the image, run shell lines
in it, reach it over TCP, account its host memory and disk, remove it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ...errors import VmctlError

COLUMN_NAMES = ("native", "container", "docker", "vm", "qemu")
DAX_MOUNT = "/mnt/vmctl-base"  # where a `dax_base` VM has the image's root file system


class ColumnUnavailable(VmctlError):
    """This column cannot run here; the message says what is missing and how to get it."""


@dataclass(frozen=True)
class InstanceSpec:
    image: str = "bench"
    cpus: int = 1
    memory_mib: int = 512
    network: bool = False  # reachable from the host at Instance.address
    memory_merge: bool = False  # VMs: guest RAM MADV_MERGEABLE (KSM)
    dax_base: bool = False  # VMs: the image's raw ext4 as virtio-pmem, mounted ro,dax at DAX_MOUNT


@dataclass(frozen=True)
class Output:
    exit_code: int
    stdout: str
    stderr: str


class Instance(Protocol):
    name: str

    @property
    def address(self) -> str | None:
        """IPv4 address the host reaches the instance at (network=True)."""

    def run(self, script: str, timeout: float = 600.0) -> Output:
        """Run a /bin/sh script in the instance."""

    def host_pids(self) -> list[int]:
        """Host processes that make up the instance (for PSS)."""

    def disk_bytes(self) -> int:
        """Bytes allocated on the host for the instance's own writes."""

    def remove(self) -> None:
        """Stop it and release everything it holds. Idempotent."""


class Runner(Protocol):
    """A column: starts instances; `close` releases what the column itself holds (a dockerd)."""

    name: str
    label: str

    def start(self, spec: InstanceSpec, index: int) -> Instance:
        """Start an instance and return once it can run commands."""

    def backing_files(self, relative: str) -> list[Path]:
        """Host files whose page cache holds the image's `relative` directory when an instance
        reads it (the tree's own files, Docker's copy of them, or a VM's base disk image)."""

    def close(self) -> None: ...


def check_ok(what: str, output: Output) -> str:
    if output.exit_code != 0:
        detail = (output.stderr.strip() or output.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise VmctlError(f"{what}: exit status {output.exit_code}: {detail[0][:200]}")
    return output.stdout


def open_column(name: str, image: str, work: Path) -> Runner:
    """The column `name`, checked usable here (ColumnUnavailable otherwise)."""
    if name == "native":
        from .native import NativeColumn

        return NativeColumn(image, work)
    if name == "container":
        from .backend import BackendColumn

        return BackendColumn("container", image, work)
    if name == "docker":
        from .docker import DockerColumn

        return DockerColumn(image, work)
    if name in ("vm", "qemu"):
        from .backend import BackendColumn

        return BackendColumn(name, image, work)
    raise VmctlError(f"unknown column {name!r} (one of: {', '.join(COLUMN_NAMES)})")
