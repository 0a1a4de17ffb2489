"""Throwaway guests for tests: a context manager, and pytest fixtures (registered as a plugin).

    from vmctl.testing import guest

    with guest({"cpus": 2, "memory": "512M"}) as vm:
        code, out, err = vm.exec("uname -r")

    def test_kernel(vmctl_guest):                 # pytest: torn down after the test
        vm = vmctl_guest({"memory": "256M"})
        assert vm.exec("true")[0] == 0

    vm = vmctl_guest({"image": "debian", "network": "isolated"})   # exec goes over SSH

`exec` goes through SSH (paramiko, the machine's own key) when the guest has a network and an
sshd, and through the guest agent on its second serial port otherwise; `put`/`get` copy files
and trees as one tar stream (`vmctl.transfer`: SSH, or the native VMM's virtio-fs transfer
share). `address` and `host_port(80)` tell where the guest is; `ready=` probes are waited for.

One guest for the whole session: `vmctl_session_guest` boots a guest the first time a spec is
asked for and returns that same guest to every later test asking for the same spec (a dict
with the same items, or the same file and name). Wrap it once in your conftest.py:

    @pytest.fixture
    def devbox(vmctl_session_guest):
        return vmctl_session_guest({"image": "debian", "network": "isolated"})

The pristine-copy-per-test pattern (native machines, docs/snapshots.md): boot a spec once,
wait until a readiness command succeeds, take a memory snapshot, and give each test a fresh
clone that continues the ready guest (no boot):

    @pytest.fixture(scope="session")
    def redis_ready(vmctl_snapshot):
        return vmctl_snapshot({"image": "debian", "command": "redis-server"}, ready="redis-cli ping")

    def test_one(redis_ready, vmctl_clone):
        vm = vmctl_clone(redis_ready)          # its own disk overlay, TAP, address, name
        vm.exec("redis-cli set k v")

Teardown always runs (failed test, exception, Ctrl-C, SIGTERM, SIGHUP): the guest, its
overlay and its state folder are removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from .backends import get_backend
from .spec import load_spec, parse_spec
from .spec.model import MachineSpec
from .state import CONSOLE, MachineRecord, StateStore


def _spec_of(spec: dict | str | Path | MachineSpec, name: str | None, ready: list[dict] | None = None) -> MachineSpec:
    if isinstance(spec, MachineSpec):
        machine = spec
    elif isinstance(spec, dict):
        machine = parse_spec(spec).machines[0]
    else:
        machines = load_spec(spec).machines
        machine = next((m for m in machines if m.name == name), None) if name else machines[0]
        if machine is None:
            raise ValueError(f"{spec}: no machine named {name!r}")
    probes = machine.ready
    if ready is not None:  # the fixture's ready=[{"tcp": 80}, ...]: the same probes as YAML's `ready:`
        probes += parse_spec({"name": "probes", "ready": ready}).machines[0].ready
    return dataclasses.replace(machine, name=f"{machine.name}-{uuid.uuid4().hex[:8]}", ephemeral=True, ready=probes)


@dataclasses.dataclass
class Guest:
    store: StateStore
    record: MachineRecord
    ready_seconds: float
    keep: bool = False  # set by --vmctl-keep-on-failure: left running for inspection

    def disown(self) -> None:
        """Keep the guest after this process: no removal at teardown, none by the reaper."""
        self.keep = True
        with self.store.locked():
            record = self.store.load(self.name)
            record.owner = None
            self.store.save(record)

    @property
    def name(self) -> str:
        return self.record.name

    def exec(self, command: str | list[str], timeout: float = 60) -> tuple[int, str, str]:
        """Run a command (a string goes to /bin/sh -c); returns (exit_code, stdout, stderr)."""
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        result = get_backend(self.record.backend).exec(self.store, self.record, argv, timeout)
        return result.exit_code, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")

    def put(self, data: bytes | str | Path, guest_path: str) -> None:
        """Bytes or text become the file `guest_path`; a host Path (file or tree) is copied there
        as with `vmctl cp` (one tar stream over SSH or the transfer share)."""
        from .transfer import copy_in

        if isinstance(data, Path):
            copy_in(self._channel(), [data], guest_path)
            return
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / "payload"
            local.write_bytes(data.encode() if isinstance(data, str) else data)
            copy_in(self._channel(), [local], guest_path)

    def get(self, guest_path: str, dest: Path | None = None) -> bytes | None:
        """The contents of the guest file `guest_path`; with `dest`, the file or tree is copied
        to the host path `dest` instead (returns None)."""
        from .transfer import copy_out

        if dest is not None:
            copy_out(self._channel(), guest_path, Path(dest))
            return None
        with tempfile.TemporaryDirectory() as folder:
            local = Path(folder) / "payload"
            copy_out(self._channel(), guest_path, local)
            if not local.is_file():
                raise RuntimeError(f"{self.name}: {guest_path} is not a file (give dest= to copy a tree)")
            return local.read_bytes()

    def _channel(self):
        from .transfer import channel_for

        return channel_for(self.store, self.record)

    @property
    def address(self) -> str | None:
        """The guest's IP address on vmctl's network (None without a network)."""
        network = self.store.network(self.name)
        return network.get("guest_ip") if network else None

    def host_port(self, guest_port: int, protocol: str = "tcp") -> int:
        """The host port (on 127.0.0.1) forwarded to `guest_port`; with `forwards: ["0:80"]`
        it is a free port picked at start, so parallel test runs never collide."""
        network = self.store.network(self.name) or {}
        for host, guest, proto in network.get("forwards", []):
            if guest == guest_port and proto == protocol:
                return host
        raise KeyError(f"{self.name}: no forward to guest port {guest_port}/{protocol}")

    @property
    def console_log(self) -> str:
        path = self.store.folder(self.name) / CONSOLE
        return path.read_text(errors="replace") if path.exists() else ""

    def _check(self, result: tuple[int, str, str], what: str) -> None:
        if result[0] != 0:
            raise RuntimeError(f"{self.name}: {what}: {result[2].strip()}")


@contextlib.contextmanager
def guest(spec: dict | str | Path | MachineSpec, name: str | None = None, timeout: float = 300,
          store: StateStore | None = None, ready: list[dict] | None = None) -> Iterator[Guest]:
    """A throwaway guest for the `with` block. `ready`: probes to wait for after boot, as in
    YAML (`[{"tcp": 80, "timeout": 30, "hint": "..."}]`)."""
    from .reaper import ensure_watchdog, owner_of

    machine = _spec_of(spec, name, ready)
    if store is None:
        # owned by this process: if it dies (even by kill -9) the watchdog removes the guest
        store = StateStore(owner=owner_of(os.getpid()))
        ensure_watchdog(store.owner, store.root.parent)
    backend = get_backend(machine.backend)
    with store.locked():
        record = backend.start(store, machine, None)
    vm = None
    try:
        from .probes import provision, wait_ready

        seconds = backend.wait_ready(store, record, timeout)
        provision(store, record, machine.provision)
        seconds += wait_ready(store, record, machine.ready)
        vm = Guest(store, record, seconds)
        yield vm
    finally:
        if not (vm is not None and vm.keep):
            with store.locked():
                backend.remove(store, record)


@contextlib.contextmanager
def snapshot_of(spec: dict | str | Path | MachineSpec, ready: str | None = None, name: str | None = None,
                timeout: float = 300, store: StateStore | None = None) -> Iterator[str]:
    """Boot `spec` once, retry `ready` (a shell command) until it succeeds, take a memory
    snapshot and yield its name; the source goes right after, the snapshot at the end."""
    import time

    from .backends.kvm_snapshot import delete, take
    from .snapshot.snapshot_store import SnapshotStore

    store = store or StateStore()
    snapshots = SnapshotStore(store.root.parent)
    snapshot = f"snap-{uuid.uuid4().hex[:6]}"
    with guest(spec, name, timeout, store) as source:
        deadline = time.monotonic() + timeout
        while ready is not None and source.exec(ready)[0] != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{source.name}: `{ready}` did not succeed within {timeout:g} s")
            time.sleep(0.5)
        with store.locked():
            take(store, store.load(source.name), snapshots, snapshot, memory=True)
    try:
        yield snapshot
    finally:
        with store.locked():
            delete(store, snapshots, snapshot)


@contextlib.contextmanager
def clone(snapshot: str, timeout: float = 300, store: StateStore | None = None) -> Iterator[Guest]:
    """A new machine restored from `snapshot` (its own overlays, TAP, address, name); removed at the end."""
    import time

    from .backends.kvm_snapshot import clone as clone_machine
    from .snapshot.snapshot_store import SnapshotStore

    store = store or StateStore()
    snapshots = SnapshotStore(store.root.parent)
    backend = get_backend("kvm")
    started = time.monotonic()
    with store.locked():
        record = clone_machine(store, snapshots, snapshots.load(snapshot), f"clone-{uuid.uuid4().hex[:6]}")
    try:
        backend.wait_ready(store, record, timeout)
        yield Guest(store, record, time.monotonic() - started)
    finally:
        with store.locked():
            backend.remove(store, record)


class _Factory:
    """Boots a guest per call; with `share`, one per distinct spec: the same spec (and name)
    asked for again returns the guest already booted."""

    def __init__(self, share: bool = False) -> None:
        self._stack = contextlib.ExitStack()
        self._share = share
        self._booted: dict[str, Guest] = {}
        self.guests: list[Guest] = []

    def __call__(self, spec: dict | str | Path | MachineSpec = None, name: str | None = None, timeout: float = 300,
                 ready: list[dict] | None = None) -> Guest:
        spec = spec if spec is not None else {}
        key = repr((_spec_key(spec), name, ready))
        if self._share and key in self._booted:
            return self._booted[key]
        booted = self._stack.enter_context(guest(spec, name, timeout, ready=ready))
        self.guests.append(booted)
        if self._share:
            self._booted[key] = booted
        return booted

    def keep(self, reporter) -> None:
        """A failed test's guests stay for inspection; say how to reach them."""
        for vm in self.guests:
            vm.disown()
            message = (f"vmctl: kept {vm.name} for inspection: vmctl exec {vm.name} -- sh -c '...' | vmctl logs {vm.name}"
                       f" | vmctl console {vm.name} | vmctl rm {vm.name}")
            if reporter is not None:
                reporter.write_line(message)
            else:
                print(message, file=sys.stderr)

    def close(self) -> None:
        self._booted.clear()
        self._stack.close()


def _spec_key(spec: dict | str | Path | MachineSpec) -> object:
    """What makes two requests the same guest: the dict's items, the file's path, the spec."""
    if isinstance(spec, dict):
        return sorted((key, repr(value)) for key, value in spec.items())
    if isinstance(spec, (str, Path)):
        return str(Path(spec).resolve())
    return spec


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM and SIGHUP (CI cancelling the job, a closed terminal) end the session like
    Ctrl-C, so every guest's teardown still runs; a handler someone else set is kept."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, interrupt)
        except ValueError:  # not the main thread
            pass


def pytest_addoption(parser) -> None:
    parser.getgroup("vmctl").addoption(
        "--vmctl-keep-on-failure", action="store_true",
        help="keep the guests of a failed test running (not removed, not reaped) and print how to reach them")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        item._vmctl_failed = True  # read by the fixture's teardown


@pytest.fixture
def vmctl_guest(request) -> Iterator[_Factory]:
    """Boots throwaway guests for one test: `vm = vmctl_guest({...})`; removed after the test
    (kept when it failed and pytest runs with --vmctl-keep-on-failure)."""
    factory = _Factory()
    try:
        yield factory
    finally:
        if getattr(request.node, "_vmctl_failed", False) and request.config.getoption("vmctl_keep_on_failure", False):
            factory.keep(request.config.pluginmanager.get_plugin("terminalreporter"))
        factory.close()


@pytest.fixture(scope="session")
def vmctl_session_guest() -> Iterator[_Factory]:
    """Like vmctl_guest, but the guests live for the whole session and are shared: every
    test that asks for the same spec gets the same booted guest (boot once)."""
    factory = _Factory(share=True)
    try:
        yield factory
    finally:
        factory.close()


class _SnapshotFactory:
    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()

    def __call__(self, spec: dict | str | Path | MachineSpec = None, ready: str | None = None, name: str | None = None,
                 timeout: float = 300) -> str:
        return self._stack.enter_context(snapshot_of(spec if spec is not None else {}, ready, name, timeout))

    def close(self) -> None:
        self._stack.close()


class _CloneFactory(_Factory):
    def __call__(self, snapshot: str, timeout: float = 300) -> Guest:  # type: ignore[override]
        return self._stack.enter_context(clone(snapshot, timeout))


@pytest.fixture(scope="session")
def vmctl_snapshot() -> Iterator[_SnapshotFactory]:
    """`snap = vmctl_snapshot(spec, ready="CMD")`: boots the spec once, snapshots it once
    `CMD` succeeds; the snapshot is deleted at the end of the session."""
    factory = _SnapshotFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def vmctl_clone() -> Iterator[_CloneFactory]:
    """`vm = vmctl_clone(snap)`: a fresh clone of a snapshot for this test (removed after it)."""
    factory = _CloneFactory()
    try:
        yield factory
    finally:
        factory.close()
