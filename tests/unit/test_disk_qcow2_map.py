"""qcow2's remembered cluster map: a mapping read once answers the next read, and leaves
the map the moment its L2 entry changes (discard, write-zeroes, copy-on-write into a new
cluster), so reads never see a stale host cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmctl.disk import open_disk
from vmctl.disk.qcow2 import image as image_mod
from vmctl.disk.qcow2.create import create, create_overlay

pytestmark = pytest.mark.unit

CLUSTER = 64 << 10


def test_changed_entries_leave_the_map(tmp_path: Path):
    path = tmp_path / "disk.qcow2"
    create(str(path), 4 << 20)
    data = os.urandom(2 * CLUSTER)
    with open_disk(str(path), read_only=False) as disk:
        disk.pwrite(0, data)
        assert disk.read(0, 2 * CLUSTER) == data
        assert set(disk._data_map) == {0, 1}  # type: ignore[attr-defined]
        disk.discard(0, CLUSTER)
        assert 0 not in disk._data_map and disk.read(CLUSTER, CLUSTER) == data[CLUSTER:]  # type: ignore[attr-defined]
        disk.write_zeroes(CLUSTER, CLUSTER)
        assert disk.read(CLUSTER, CLUSTER) == bytes(CLUSTER)
        assert disk.read(0, CLUSTER) == bytes(CLUSTER)  # discarded, no backing file: zeros


def test_an_overlay_write_moves_the_cluster_and_the_map_follows(tmp_path: Path):
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    create(str(base), 4 << 20)
    old = os.urandom(CLUSTER)
    with open_disk(str(base), read_only=False) as disk:
        disk.pwrite(0, old)
    create_overlay(str(base), str(top))
    new = os.urandom(4096)
    with open_disk(str(top), read_only=False) as disk:
        assert disk.read(0, CLUSTER) == old  # from the backing file
        assert disk._data_map[0] == -1  # type: ignore[attr-defined]  # remembered as unallocated here
        disk.pwrite(4096, new)  # copy-on-write into the top's own cluster: the mapping is dropped
        assert disk.read(0, CLUSTER) == old[:4096] + new + old[8192:]
        assert disk._data_map[0] > 0  # type: ignore[attr-defined]
        disk.pwrite(0, new)  # in place now: same cluster, same mapping
        assert disk.read(0, 8192) == new + new


def test_the_map_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(image_mod, "DATA_MAP_ENTRIES", 4)
    path = tmp_path / "disk.qcow2"
    create(str(path), 4 << 20)
    data = os.urandom(10 * CLUSTER)
    with open_disk(str(path), read_only=False) as disk:
        disk.pwrite(0, data)
        for cluster in range(10):
            assert disk.read(cluster * CLUSTER, CLUSTER) == data[cluster * CLUSTER : (cluster + 1) * CLUSTER]
            assert len(disk._data_map) <= 4  # type: ignore[attr-defined]
