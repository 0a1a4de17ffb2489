"""The snapshot directory format: header, checksums, the sparse memory file, and refusals."""

from __future__ import annotations

import os
import struct

import pytest

from vmctl.memory import GuestMemory
from vmctl.snapshot import snapshot_file as fmt

REGION = 4 << 20


@pytest.fixture
def snapshot(tmp_path):
    """A snapshot folder with a small JSON state and 4 MiB of mostly-zero memory."""
    memory = GuestMemory([(0, REGION)])
    memory.write(0x1000, b"page one")
    memory.write(0x300000, b"\xff" * 100)
    folder = tmp_path / "snap"
    folder.mkdir()
    writer = fmt.MemoryWriter(folder / fmt.MEMORY_FILE)
    region = memory.regions[0]
    assert writer.write_region(region.host_address, region.view) == 0
    size, digest = writer.finish()
    memory.close()
    fmt.write_state(folder, {"machine": {"memory": REGION}, "memory_file": {"size": size, "sha256": digest}})
    return folder


def test_round_trip_and_sparse_memory(snapshot):
    loaded = fmt.read_snapshot(snapshot)
    assert loaded.state["machine"] == {"memory": REGION}
    memory_file = snapshot / fmt.MEMORY_FILE
    assert memory_file.stat().st_size == REGION
    assert memory_file.stat().st_blocks * 512 <= 2 * fmt.CHUNK  # two non-zero chunks, the rest holes
    data = memory_file.read_bytes()
    assert data[0x1000:0x1008] == b"page one" and data[0x300000:0x300064] == b"\xff" * 100
    assert sorted(p.name for p in snapshot.iterdir()) == sorted([fmt.MEMORY_FILE, fmt.STATE_FILE, fmt.VERIFIED_STAMP])


def test_checksum_does_not_depend_on_holes(snapshot, tmp_path):
    dense = tmp_path / "dense"
    dense.write_bytes((snapshot / fmt.MEMORY_FILE).read_bytes())  # a copy that wrote every zero
    assert fmt.memory_checksum(dense) == fmt.memory_checksum(snapshot / fmt.MEMORY_FILE)


def _state(snapshot) -> bytearray:
    return bytearray((snapshot / fmt.STATE_FILE).read_bytes())


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:40], "truncated: 40 bytes, the header alone is 64"),
    (lambda data: data[:-5], "truncated: .* the header .byte 16. says"),
    (lambda data: b"XXXXXXXX" + data[8:], r"not a vmctl snapshot \(bad magic at byte 0\)"),
    (lambda data: data[:8] + struct.pack("<I", 99) + data[12:], "snapshot format version 99 .byte 8., this vmctl .* reads version 1 only"),
    (lambda data: data[:70] + bytes([data[70] ^ 1]) + data[71:], "checksum mismatch .*: the file is corrupted"),
    (lambda data: data + b"x", "trailing bytes"),
])
def test_damaged_state_file_is_one_line_naming_the_file(snapshot, damage, message):
    (snapshot / fmt.STATE_FILE).write_bytes(bytes(damage(_state(snapshot))))
    with pytest.raises(fmt.SnapshotError, match=message) as error:
        fmt.read_snapshot(snapshot)
    assert _one_line(error).startswith(str(snapshot / fmt.STATE_FILE))


def test_truncated_memory_file_is_refused(snapshot):
    os.truncate(snapshot / fmt.MEMORY_FILE, REGION // 2)
    with pytest.raises(fmt.SnapshotError, match=f"memory: truncated: {REGION // 2} bytes, the snapshot saved {REGION}"):
        fmt.read_snapshot(snapshot)


def test_corrupted_memory_file_is_refused_even_after_a_good_check(snapshot):
    fmt.read_snapshot(snapshot)  # checked once: a stamp records it
    with open(snapshot / fmt.MEMORY_FILE, "r+b") as file:
        file.seek(0x1000)
        file.write(b"PAGE ONE")
    with pytest.raises(fmt.SnapshotError, match="memory: checksum mismatch: the guest memory file is corrupted"):
        fmt.read_snapshot(snapshot)


def test_missing_parts(snapshot, tmp_path):
    (snapshot / fmt.MEMORY_FILE).unlink()
    with pytest.raises(fmt.SnapshotError, match="memory: missing"):
        fmt.read_snapshot(snapshot)
    (snapshot / fmt.STATE_FILE).unlink()
    with pytest.raises(fmt.SnapshotError, match="state: missing .not a complete snapshot."):
        fmt.read_snapshot(snapshot)
    with pytest.raises(fmt.SnapshotError, match="no such snapshot"):
        fmt.read_snapshot(tmp_path / "nothing")


def test_a_snapshot_without_its_state_file_is_incomplete(snapshot):
    (snapshot / fmt.STATE_FILE).rename(snapshot / f"{fmt.STATE_FILE}.tmp")  # as a crash mid-save leaves it
    with pytest.raises(fmt.SnapshotError, match="state: missing .not a complete snapshot."):
        fmt.read_snapshot(snapshot)
