"""The control protocol against a fake VMM process (a real ControlServer, no KVM), and the
native backend's `down` sequence (shutdown, then stop, then SIGKILL) driven through it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vmctl.backends.kvm import KvmBackend
from vmctl.errors import VmctlError
from vmctl.state import CONTROL, MachineRecord, StateStore
from vmctl.vmm.control import request

# A stand-in for vmctl.vmm.daemon: same server, handlers that only record what they got.
# `on_shutdown` / `on_stop` say whether that request makes it exit (as a guest powering off).
FAKE_VMM = textwrap.dedent("""
    import os, sys, threading, time
    from pathlib import Path
    from vmctl.errors import VmctlError
    from vmctl.vmm.control import ControlServer

    path, on_shutdown, on_stop = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    done = threading.Event()
    release = threading.Event()
    log = open(path.with_name("requests.log"), "a", buffering=1)

    def handler(op, exits):
        def handle(message):
            log.write(op + "\\n")
            if exits == "exit":
                threading.Timer(0.1, done.set).start()
            return {"op": op}
        return handle

    def slow(message):
        release.wait(30)
        return {"slept": True}

    def fail(message):
        raise VmctlError("the guest agent did not answer within 1 s")

    server = ControlServer(path, {
        "status": lambda m: {"state": "running", "pid": os.getpid(), "echo": m.get("echo")},
        "shutdown": handler("shutdown", on_shutdown), "stop": handler("stop", on_stop),
        "slow": slow, "release": lambda m: (release.set(), {})[1], "fail": fail,
    })
    server.start()
    print("ready", flush=True)
    done.wait()
    server.close()
""")


@pytest.fixture
def fake_vmm(tmp_path):
    started = []

    def start(on_shutdown: str = "exit", on_stop: str = "exit") -> tuple[subprocess.Popen, Path]:
        folder = tmp_path / "machines" / "m"
        folder.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen([sys.executable, "-c", FAKE_VMM, str(folder / CONTROL), on_shutdown, on_stop],
                                   stdout=subprocess.PIPE, text=True)
        started.append(process)
        assert process.stdout.readline() == "ready\n"
        return process, folder

    yield start
    for process in started:
        process.kill()
        process.wait()


def test_requests_and_answers(fake_vmm):
    process, folder = fake_vmm()
    answer = request(folder / CONTROL, "status", echo="hi")
    assert answer == {"ok": True, "state": "running", "pid": process.pid, "echo": "hi"}


def test_errors_come_back_as_one_line_vmctl_errors(fake_vmm):
    _, folder = fake_vmm()
    path = folder / CONTROL
    with pytest.raises(VmctlError, match=r"control.sock: bad request: 'nope'$"):
        request(path, "nope")
    with pytest.raises(VmctlError, match=r"control.sock: the guest agent did not answer within 1 s$"):
        request(path, "fail")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:  # not JSON at all
        raw.connect(str(path))
        raw.sendall(b"status please\n")
        reply = json.loads(raw.makefile().readline())
    assert reply["ok"] is False and reply["error"].startswith("bad request: ")


def test_a_slow_request_does_not_hold_up_status(fake_vmm):
    _, folder = fake_vmm()
    path = folder / CONTROL
    slow = subprocess.Popen([sys.executable, "-c", f"from vmctl.vmm.control import request; print(request({str(path)!r}, 'slow', timeout=60))"],
                            stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            assert request(path, "status")["state"] == "running"
        request(path, "release")
        assert "'slept': True" in slow.communicate(timeout=30)[0]
    finally:
        slow.kill()
        slow.wait()


def test_a_vmm_that_is_gone_is_an_error_naming_the_socket(fake_vmm, tmp_path):
    process, folder = fake_vmm()
    request(folder / CONTROL, "stop")
    process.wait(timeout=30)
    assert not (folder / CONTROL).exists()  # the server removes its socket
    with pytest.raises(VmctlError, match=r"control.sock: the VMM does not answer: No such file or directory"):
        request(folder / CONTROL, "status")


def _record(store: StateStore, process: subprocess.Popen) -> MachineRecord:
    record = MachineRecord(name="m", backend="kvm", pid=process.pid)
    store.save(record)
    return record


@pytest.mark.parametrize("on_shutdown, on_stop, expected", [
    ("exit", "exit", ["shutdown"]),              # the guest powers off when asked
    ("ignore", "exit", ["shutdown", "stop"]),    # it does not: the VM is stopped after the timeout
    ("ignore", "ignore", ["shutdown", "stop"]),  # the VMM does not stop either: SIGKILL
])
def test_down_asks_the_guest_then_stops_then_kills(fake_vmm, tmp_path, on_shutdown, on_stop, expected):
    process, folder = fake_vmm(on_shutdown, on_stop)
    store = StateStore(tmp_path)
    record = _record(store, process)
    KvmBackend().stop(store, record, timeout=1)
    assert process.wait(timeout=10) is not None  # gone
    assert (folder / "requests.log").read_text().split() == expected
    assert KvmBackend().status(store, record).state == "dead"  # no outcome.json from a fake


def test_status_of_a_live_vmm_shows_its_address(fake_vmm, tmp_path):
    process, folder = fake_vmm()
    store = StateStore(tmp_path)
    record = _record(store, process)
    (folder / "network.json").write_text(json.dumps({"tap": "vmctl3", "guest_ip": "172.30.0.6"}))
    status = KvmBackend().status(store, record)
    assert (status.state, status.pid, status.detail) == ("running", process.pid, "172.30.0.6 (vmctl3)")
    (folder / "outcome.json").write_text(json.dumps({"exit_code": 0, "reason": "guest exited with status 0",
                                                     "crashed": False, "ended": time.time()}))
    assert KvmBackend().status(store, record).state == "exited"
