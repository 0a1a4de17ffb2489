"""The "pristine database per test" pattern with a real service (docs/snapshots.md): the
bench image's redis-server is booted once and seeded, a memory snapshot is taken, and every
test gets its own clone that continues the seeded server (no boot): what one test writes,
the next never sees."""

from __future__ import annotations

import pytest

from vmctl.images import locate

SEED = "redis-cli ping | grep -q PONG && redis-cli set seeded yes >/dev/null && redis-cli set counter 1 >/dev/null"


@pytest.fixture(autouse=True)
def state_dir(tmp_path_factory, monkeypatch) -> None:
    # One state folder for the module: the snapshot (module scope) and the clones share it.
    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path_factory.getbasetemp() / "fixture-state"))


@pytest.fixture(scope="module")
def seeded_redis(vmctl_snapshot, tmp_path_factory):
    if not locate("bench").rootfs_qcow2.exists():
        pytest.skip("the bench image is not built: vmctl image build --profile bench")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VMCTL_STATE_DIR", str(tmp_path_factory.getbasetemp() / "fixture-state"))
        return vmctl_snapshot({"image": "bench", "memory": "256M",
                               "command": ["redis-server", "--save", "", "--appendonly", "no"]}, ready=SEED)


def redis(vm, command: str) -> str:
    code, out, err = vm.exec(f"redis-cli {command}")
    assert code == 0, (command, err)
    return out.strip()


def test_a_clone_continues_the_seeded_server_and_writes_to_it(seeded_redis, vmctl_clone):
    vm = vmctl_clone(seeded_redis)
    assert redis(vm, "get seeded") == "yes"
    assert redis(vm, "incr counter") == "2"
    assert redis(vm, "set written-by-first-test 1") == "OK"


def test_the_next_clone_starts_from_the_pristine_seed(seeded_redis, vmctl_clone):
    vm = vmctl_clone(seeded_redis)
    assert redis(vm, "get counter") == "1"
    assert redis(vm, "exists written-by-first-test") == "0"


def test_two_clones_at_once_do_not_share_writes(seeded_redis, vmctl_clone):
    first, second = vmctl_clone(seeded_redis), vmctl_clone(seeded_redis)
    assert first.name != second.name
    redis(first, "set only-here first")
    assert redis(second, "exists only-here") == "0"
    assert redis(first, "get only-here") == "first"
