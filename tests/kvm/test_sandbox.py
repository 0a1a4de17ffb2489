"""The VMM sandbox (vmm/sandbox.py): after every fd is open, the VMM runs as `nobody` with
no_new_privs and a seccomp allow-list; a system call outside it kills the process."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest

from vmctl.vmm.sandbox import allowed, available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

CHILD = textwrap.dedent("""
    import io, json, os, sys
    from pathlib import Path
    from vmctl.vmm.machine import Machine, MachineConfig
    from vmctl.vmm import sandbox
    console = io.BytesIO()
    states = []
    def enter():
        states.append(sandbox.enter("nobody", []))
    machine = Machine(MachineConfig(kernel=Path(sys.argv[1]), cpus=2, memory=64 << 20,
                                    console_sinks=[console], timeout=60, before_start=enter))
    outcome = machine.run()
    print(json.dumps({"exit": outcome.exit_code, "console": console.getvalue().decode(),
                      "sandbox": states[0].as_dict()}), flush=True)
    if sys.argv[2] == "exec":
        os.execv("/bin/true", ["true"])
    elif sys.argv[2] == "setuid":
        os.setuid(0)
    elif sys.argv[2] == "mount":
        import ctypes
        ctypes.CDLL(None, use_errno=True).mount(b"none", b"/tmp", b"tmpfs", 0, None)
    print("still alive", flush=True)
""")


def run_child(kernel, then: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(kernel), then], capture_output=True,
                          text=True, timeout=120)


def test_sandboxed_vmm_runs_a_guest(assemble):
    done = run_child(assemble("hello.S", STATUS=0), "nothing")
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    report = json.loads(first)
    assert report["exit"] == 0 and report["console"] == "hello from the guest\n"
    assert report["sandbox"]["user"] == "nobody" and report["sandbox"]["no_new_privs"]
    assert report["sandbox"]["seccomp"] == "filter"
    assert report["sandbox"]["allowed_syscalls"] == len(allowed())
    assert second == "still alive"


@pytest.mark.parametrize("forbidden", ["exec", "setuid", "mount"])
def test_a_forbidden_system_call_kills_the_vmm(assemble, forbidden):
    done = run_child(assemble("hello.S", STATUS=0), forbidden)
    assert done.returncode == -signal.SIGSYS, (done.returncode, done.stderr)
    assert "still alive" not in done.stdout


def test_daemon_in_the_sandbox_reports_it_in_status(assemble, vmctl_cli, tmp_path, monkeypatch):
    state = tempfile.mkdtemp(prefix="vmctl-sandbox-")  # pytest's tmp_path is 0700: nobody
    os.chmod(state, 0o755)  # could not write the outcome there
    monkeypatch.setenv("VMCTL_STATE_DIR", state)
    monkeypatch.setenv("VMCTL_SANDBOX", "1")
    spec = tmp_path / "s.yaml"
    spec.write_text(f"machines:\n  boxed:\n    kernel: {assemble('hello.S', STATUS=0)}\n"
                    "    memory: 32M\n")  # no network: the VMM can also drop to nobody
    up = vmctl_cli("up", str(spec))
    try:
        assert up.returncode == 0, up.stderr
        status = json.loads(vmctl_cli("status", "boxed").stdout)
        assert status["state"] == "exited" and status["exit_code"] == 0, status
        assert status["sandbox"]["seccomp"] == "filter" and status["sandbox"]["user"] == "nobody"
    finally:
        vmctl_cli("rm", "boxed")
        shutil.rmtree(state, ignore_errors=True)
    check = vmctl_cli("host-check")
    assert "vmm sandbox" in check.stdout and "available" in check.stdout


def _nat_rules() -> str:
    return subprocess.run(["iptables", "-w", "-t", "nat", "-S", "POSTROUTING"], capture_output=True,
                          text=True).stdout


@pytest.fixture
def sandbox_state(monkeypatch):
    state = tempfile.mkdtemp(prefix="vmctl-sandbox-")  # pytest's tmp_path is 0700: nobody
    os.chmod(state, 0o755)  # could not write the outcome there
    monkeypatch.setenv("VMCTL_STATE_DIR", state)
    monkeypatch.setenv("VMCTL_SANDBOX", "1")
    yield state
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(params=["interpreter", "launcher"])
def spawned_by(request, tmp_path, monkeypatch):
    """The daemon as a new interpreter, or forked by the launcher (which must pass
    VMCTL_SANDBOX on with the client's environment)."""
    if request.param == "launcher":
        from vmctl.launcher import client
        folder = tmp_path / "launcher"
        folder.mkdir(mode=0o700)
        socket_path = str(folder / "launcher.sock")
        server = subprocess.Popen([sys.executable, "-m", "vmctl.launcher", "serve", socket_path, "--idle", "120"],
                                  stdin=subprocess.DEVNULL)
        assert client.wait_for_server(socket_path, 60)
        monkeypatch.setenv("VMCTL_LAUNCHER", socket_path)
        monkeypatch.delenv(client.ENV, raising=False)
        yield server
        server.kill()
        server.wait()
    else:
        monkeypatch.delenv("VMCTL_LAUNCHER", raising=False)
        yield None


def test_networked_machine_is_sandboxed_and_its_nat_rule_goes_when_the_vmm_is_killed(
        assemble, vmctl_cli, tmp_path, sandbox_state, spawned_by):
    """A machine on `network: nat` runs as nobody under the filter; the NAT rule it needed
    root to add is removed by its guard process when the VMM is killed with -9."""
    spec = tmp_path / "s.yaml"
    spec.write_text(f"machines:\n  boxnet:\n    kernel: {assemble('forever.S')}\n    memory: 32M\n"
                    "    network: nat\n")
    up = vmctl_cli("up", str(spec), "--no-wait")
    try:
        assert up.returncode == 0, up.stderr
        folder = os.path.join(sandbox_state, "machines", "boxnet")
        record = json.loads(open(os.path.join(folder, "machine.json")).read())
        if spawned_by is not None:
            assert record["pid"] in [int(p) for p in open(
                f"/proc/{spawned_by.pid}/task/{spawned_by.pid}/children").read().split()]
        tap = _wait_for(lambda: json.loads(open(os.path.join(folder, "network.json")).read())["tap"])
        report = _wait_for(lambda: json.loads(open(os.path.join(folder, "sandbox.json")).read()))
        assert report["seccomp"] == "filter" and report["user"] == "nobody", report
        assert any("guard process" in note for note in report["notes"]), report
        assert f"vmctl:{tap}" in _nat_rules()
        status = json.loads(vmctl_cli("status", "boxnet").stdout)
        assert status["state"] == "running" and status["sandbox"]["seccomp"] == "filter", status
        os.kill(record["pid"], signal.SIGKILL)
        assert _wait_for(lambda: f"vmctl:{tap}" not in _nat_rules()), _nat_rules()
    finally:
        vmctl_cli("rm", "boxnet")


def _wait_for(probe, seconds: float = 60):
    """The first truthy value of `probe()` (errors count as not yet), or None at the deadline."""
    import time
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (OSError, ValueError, KeyError):
            value = None
        if value:
            return value
        time.sleep(0.2)
    return None


def test_a_snapshot_of_a_sandboxed_machine(assemble, vmctl_cli, tmp_path, sandbox_state):
    """`vmctl snapshot create` is served by the VMM (folder, overlay hard-linked into a
    read-only layer, memory): under the filter it died with SIGSYS at mkdir."""
    spec = tmp_path / "s.yaml"
    spec.write_text(f"machines:\n  snapbox:\n    kernel: {assemble('forever.S')}\n    memory: 32M\n"
                    "    disks:\n      - size: 16M\n")
    try:
        assert vmctl_cli("up", str(spec), "--no-wait").returncode == 0
        folder = os.path.join(sandbox_state, "machines", "snapbox")
        assert _wait_for(lambda: json.loads(open(os.path.join(folder, "sandbox.json")).read())["seccomp"] == "filter")
        created = vmctl_cli("snapshot", "create", "--memory", "snapbox", "s1")
        assert created.returncode == 0, created.stderr
        status = json.loads(vmctl_cli("status", "snapbox").stdout)
        assert status["state"] == "running", status
    finally:
        vmctl_cli("rm", "snapbox")
        vmctl_cli("snapshot", "delete", "s1")


FUSE_CHILD = """
import os, sys, tempfile, json
sys.path.insert(0, sys.argv[1])
from targets import _fuse_bytes
from vmctl.fs import protocol as fp
from vmctl.fs.server import FileServer
from vmctl.vmm import sandbox
work = tempfile.mkdtemp()
open(os.path.join(work, "file"), "wb").write(b"0123456789")
mode = sys.argv[2]
server = FileServer(work, cache=mode)
sandbox.enter(None, [])
z = [0] * 16
# `never` answers OPEN(DIR) with handles 1 and 3; `auto` with ENOSYS (I/O then by node, handle 0)
fh, dh = (1, 3) if mode == "never" else (0, 0)
S_IFIFO = 0o010000
requests = [
    (fp.INIT, 1, [7, 31] + z[2:], [], 0, 0),
    (fp.LOOKUP, 1, z, [b"file"], 0, 0),                       # node 2
    (fp.OPEN, 2, [os.O_RDWR] + z[1:], [], 0, 0),
    (fp.WRITE, 2, [fh, 0, 3] + z[3:], [], 0, 0),
    (fp.READ, 2, [fh, 0, 10] + z[3:], [], 0, 0),
    (fp.SETATTR, 2, [fp.FATTR_SIZE | fp.FATTR_MODE | fp.FATTR_UID | fp.FATTR_GID | fp.FATTR_MTIME, 0, 0, 5, 0, 0, 7, 0, 0, 0, 0, 0o100600, 0, 1000, 1000] + [0], [], 0, 0),
    (fp.FSYNC, 2, [fh] + z[1:], [], 0, 0),
    (fp.MKDIR, 1, [0o755, 0] + z[2:], [b"d"], 1000, 0),
    (fp.SYMLINK, 1, z, [b"s", b"file"], 1000, 0),
    (fp.MKNOD, 1, [S_IFIFO | 0o644, 0, 0] + z[3:], [b"p"], 1000, 0),
    (fp.CREATE, 1, [os.O_RDWR, 0o644, 0] + z[3:], [b"c"], 1000, 0),
    (fp.LINK, 1, [2] + z[1:], [b"h"], 0, 0),
    (fp.RENAME, 1, [1] + z[1:], [b"c", b"c2"], 0, 0),
    (fp.RENAME2, 1, [1, 1, 0] + z[3:], [b"c2", b"c3"], 0, 0),
    (fp.LOOKUP, 1, z, [b"s"], 0, 0),
    (fp.READLINK, 4, z, [], 0, 0),
    (fp.STATFS, 1, z, [], 0, 0),
    (fp.OPENDIR, 1, z, [], 0, 0),
    (fp.READDIR, 1, [dh, 0, 4096] + z[3:], [], 0, 0),
    (fp.READDIRPLUS, 1, [dh, 0, 4096] + z[3:], [], 0, 0),
    (fp.FSYNCDIR, 1, [dh] + z[1:], [], 0, 0),
    (fp.RELEASEDIR, 1, [dh] + z[1:], [], 0, 0),
    (fp.UNLINK, 1, z, [b"h"], 0, 0),
    (fp.RMDIR, 1, z, [b"d"], 0, 0),
    (fp.RELEASE, 2, [fh] + z[1:], [], 0, 0),
]
errors = []
for r in requests:
    answer = server.handle(_fuse_bytes(*r))
    errors.append(fp.OUT_HEADER.unpack_from(answer)[1] if answer else None)
print(json.dumps(errors), flush=True)
"""


@pytest.mark.parametrize("mode", ["auto", "never"])
def test_the_virtio_fs_file_server_works_under_the_filter(tmp_path, mode):
    """The FUSE server of virtio-fs runs in the VMM: every operation the guest can ask of a
    shared folder (mkdir, symlink, mknod, chown, utimens, statfs, readlink, link, rename,
    readdir, fsync...) under the filter. fchownat killed it before the "shared folders"
    group (a sandboxed machine with `mounts:` died on the guest's first mkdir)."""
    fuzz = os.path.join(os.path.dirname(__file__), "..", "fuzz")
    done = subprocess.run([sys.executable, "-c", FUSE_CHILD, fuzz, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    errors = json.loads(done.stdout)
    opens = [2, 17]  # OPEN, OPENDIR
    assert [errors[i] for i in opens] == [0 if mode == "never" else -errno.ENOSYS] * 2, done.stdout
    assert {e for i, e in enumerate(errors) if i not in opens} == {0}, done.stdout
