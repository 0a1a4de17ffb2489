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
over the same channel.

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

import base64
import contextlib
import dataclasses
import shlex
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from .backends import get_backend
from .spec import load_spec, parse_spec
from .spec.model import MachineSpec
from .state import CONSOLE, MachineRecord, StateStore

CHUNK = 24 * 1024  # bytes per exec when copying files: base64 twice (here and on the agent line) stays under the UART's 64 KiB input buffer


def _spec_of(spec: dict | str | Path | MachineSpec, name: str | None) -> MachineSpec:
    if isinstance(spec, MachineSpec):
        machine = spec
    elif isinstance(spec, dict):
        machine = parse_spec(spec).machines[0]
    else:
        machines = load_spec(spec).machines
        machine = next((m for m in machines if m.name == name), None) if name else machines[0]
        if machine is None:
            raise ValueError(f"{spec}: no machine named {name!r}")
    return dataclasses.replace(machine, name=f"{machine.name}-{uuid.uuid4().hex[:8]}", ephemeral=True)


@dataclasses.dataclass
class Guest:
    store: StateStore
    record: MachineRecord
    ready_seconds: float

    @property
    def name(self) -> str:
        return self.record.name

    def exec(self, command: str | list[str], timeout: float = 60) -> tuple[int, str, str]:
        """Run a command (a string goes to /bin/sh -c); returns (exit_code, stdout, stderr)."""
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        result = get_backend(self.record.backend).exec(self.store, self.record, argv, timeout)
        return result.exit_code, result.stdout.decode(errors="replace"), result.stderr.decode(errors="replace")

    def put(self, data: bytes | str | Path, guest_path: str) -> None:
        payload = Path(data).read_bytes() if isinstance(data, Path) else data.encode() if isinstance(data, str) else data
        target = shlex.quote(guest_path)
        self._check(self.exec(f": > {target}"), f"cannot create {guest_path}")
        for start in range(0, len(payload), CHUNK):
            chunk = base64.b64encode(payload[start : start + CHUNK]).decode()
            self._check(self.exec(f"echo {chunk} | base64 -d >> {target}"), f"cannot write {guest_path}")

    def get(self, guest_path: str) -> bytes:
        code, out, err = self.exec(f"base64 < {shlex.quote(guest_path)}")
        self._check((code, out, err), f"cannot read {guest_path}")
        return base64.b64decode(out)

    @property
    def console_log(self) -> str:
        path = self.store.folder(self.name) / CONSOLE
        return path.read_text(errors="replace") if path.exists() else ""

    def _check(self, result: tuple[int, str, str], what: str) -> None:
        if result[0] != 0:
            raise RuntimeError(f"{self.name}: {what}: {result[2].strip()}")


@contextlib.contextmanager
def guest(spec: dict | str | Path | MachineSpec, name: str | None = None, timeout: float = 300,
          store: StateStore | None = None) -> Iterator[Guest]:
    machine = _spec_of(spec, name)
    store = store or StateStore()
    backend = get_backend(machine.backend)
    with store.locked():
        record = backend.start(store, machine, None)
    try:
        yield Guest(store, record, backend.wait_ready(store, record, timeout))
    finally:
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

    def __call__(self, spec: dict | str | Path | MachineSpec = None, name: str | None = None, timeout: float = 300) -> Guest:
        spec = spec if spec is not None else {}
        key = repr((_spec_key(spec), name))
        if self._share and key in self._booted:
            return self._booted[key]
        booted = self._stack.enter_context(guest(spec, name, timeout))
        if self._share:
            self._booted[key] = booted
        return booted

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


@pytest.fixture
def vmctl_guest() -> Iterator[_Factory]:
    """Boots throwaway guests for one test: `vm = vmctl_guest({...})`; removed after the test."""
    factory = _Factory()
    try:
        yield factory
    finally:
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
