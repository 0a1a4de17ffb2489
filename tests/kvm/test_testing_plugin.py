"""The throwaway-guest API (vmctl.testing) with a tiny guest: readiness and guaranteed teardown."""

from __future__ import annotations

import os

import pytest

from vmctl.errors import VmctlError
from vmctl.state import StateStore
from vmctl.testing import guest


def test_context_manager_removes_the_guest_even_when_the_body_fails(assemble, tmp_path):
    store = StateStore(tmp_path)
    with pytest.raises(VmctlError, match="the guest agent did not start"):
        with guest({"kernel": str(assemble("ready.S")), "memory": "32M"}, store=store) as vm:
            assert vm.ready_seconds >= 0 and "VMCTL-READY" in vm.console_log
            pid = vm.record.pid
            assert os.path.exists(f"/proc/{pid}")
            vm.exec("true", timeout=0.5)  # this tiny guest runs no agent
    assert store.names() == []
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z"


def test_fixture_tears_down_after_the_test(vmctl_guest, assemble, tmp_path, monkeypatch):
    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path))
    vm = vmctl_guest({"kernel": str(assemble("ready.S")), "memory": "32M"})
    assert StateStore().names() == [vm.name]
