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


def test_session_factory_shares_one_guest_per_spec(assemble, tmp_path, monkeypatch):
    from vmctl.testing import _Factory

    monkeypatch.setenv("VMCTL_STATE_DIR", str(tmp_path))
    factory = _Factory(share=True)
    try:
        spec = {"kernel": str(assemble("ready.S")), "memory": "32M"}
        first = factory(spec)
        assert factory(dict(spec)) is first  # the same spec: the same booted guest
        other = factory({**spec, "memory": "48M"})
        assert other is not first and sorted(StateStore().names()) == sorted([first.name, other.name])
    finally:
        factory.close()
    assert StateStore().names() == []


def test_sigterm_to_pytest_still_tears_the_guest_down(assemble, tmp_path):
    """CI cancelling a job sends SIGTERM: the fixture's guest must not outlive pytest."""
    import signal
    import subprocess
    import sys
    import time

    state = tmp_path / "state"
    test_file = tmp_path / "test_slow.py"
    test_file.write_text(
        "import time\n"
        f"def test_slow(vmctl_guest):\n"
        f"    vmctl_guest({{'kernel': {str(assemble('ready.S'))!r}, 'memory': '32M'}})\n"
        "    open('booted', 'w').close()\n"
        "    time.sleep(120)\n")
    env = dict(os.environ, VMCTL_STATE_DIR=str(state))
    process = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "booted").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "booted").exists(), "the test did not boot its guest"
        assert StateStore(state).names() != []
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0].decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert StateStore(state).names() == [], output
