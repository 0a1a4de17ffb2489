"""Short runs of the qemu-io differential tester and the kill -9 / ENOSPC / EIO crash harness
(long runs: scripts/qcow2-difftest, scripts/qcow2-crash; figures in docs/reliability.md)."""

from __future__ import annotations

import shutil
import struct

import pytest

from vmctl.disk.qcow2 import crashtest, difftest

pytestmark = pytest.mark.skipif(shutil.which("qemu-io") is None,
                                reason="qemu-img/qemu-io not installed (Debian qemu-utils)")


@pytest.mark.parametrize("seed", [1, 2, 3, 5, 8, 13])
def test_vmctl_and_qemu_io_agree(tmp_path, seed):
    result = difftest.run(seed, str(tmp_path), op_count=25)
    assert result.ok, (result.config, result.problems)


def test_the_differential_tester_can_fail(tmp_path):
    """A corrupted result must be reported (the tester is not vacuous)."""
    path = tmp_path / "x.qcow2"
    difftest._make(str(path), difftest.Config(65536, "1.1", 16, False, "vmctl", False,
                                               difftest.MiB), None)
    difftest._apply_vmctl(str(path), [("write", 0, 4096, 7)])
    with open(path, "r+b") as file:  # zero the refcount of the L2 table
        file.seek(0x20000 + 2 * 4)
        file.write(struct.pack(">H", 0))
    problems: list[str] = []
    difftest._checks(str(path), "tampered", problems)
    assert any("vmctl check" in p for p in problems)
    assert any("qemu-img check" in p for p in problems)


@pytest.mark.parametrize("seed,fault", [(11, "kill"), (12, "kill"), (13, "ENOSPC"),
                                        (14, "EIO")])
def test_crash_leaves_no_corruption_and_flushed_data(tmp_path, seed, fault):
    outcome = crashtest.iteration(seed, str(tmp_path), fault)
    assert not outcome.problems, outcome
