"""Fixtures shared by the unit tests of the backends: a state folder, a snapshot store, and a
libvirt backend on libvirt's own `test:///default` driver (real to libvirt, no QEMU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from vmctl.snapshot.snapshot_store import SnapshotStore
from vmctl.state import StateStore

LIBVIRT_TEST_URI = "test:///default"


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "state")


@pytest.fixture
def snapshots(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "state")


@pytest.fixture
def backend() -> Iterator[Any]:
    """The libvirt backend (the only backend unit tests drive through this name)."""
    pytest.importorskip("libvirt", reason="libvirt-python is not installed (scripts/libvirt-setup)")
    from vmctl.backends.libvirt.backend import LibvirtBackend

    backend = LibvirtBackend()
    yield backend
    backend.close()


@pytest.fixture
def libvirt_machine(tmp_path: Path) -> Callable[..., Any]:
    """make(name, disks=["base.qcow2"], **fields): a parsed libvirt machine on the test
    driver, with a dummy kernel and a 4 MiB qcow2 base in tmp_path."""
    from vmctl.disk.qcow2.create import create
    from vmctl.spec import parse_spec

    def make(name: str, disks: list[Any] | None = None, **fields: Any) -> Any:
        (tmp_path / "bzImage").write_bytes(b"kernel")
        create(str(tmp_path / "base.qcow2"), 4 << 20)
        document = {"name": name, "backend": "libvirt", "kernel": "bzImage",
                    "disks": disks or ["base.qcow2"], "memory": "64M",
                    "libvirt": {"uri": LIBVIRT_TEST_URI}, **fields}
        return parse_spec(document, source=str(tmp_path / "vm.yaml"), base_dir=tmp_path).machines[0]

    return make
