"""`backend: container`: the lifecycle verbs for a machine run as an OCI container.

`start` checks what can be checked on the user's terminal (runtime installed, base tree
built, spec fields that mean nothing to a container), writes the bundle and hands over to a
monitor process (monitor.py), then waits for its one-line report: the container is running,
or it failed and the monitor already undid everything. `remove` releases whatever is left
in any state, including after kill -9 of the monitor or of the container's init.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from ... import signals
from ...errors import VmctlError
from ...guest_contract import READY_MARKER_BYTES, ExecResult, exec_script
from ...plans import ContainerRecord
from ...proc import allocated_bytes, pid_alive, reap, send_signal
from ...spec.model import LibvirtSpec, MachineSpec
from ...state import CONSOLE, OUTCOME, MachineRecord, StateStore
from ..base import MachineStatus, MarkerScan, SshTarget, Usage, process_status, ssh_target
from .bundle import build_config
from .monitor import MONITOR_PID, PLAN, Plan, paths, release
from .overlay_root import base_tree
from .runtime import CGROUP_PARENT, Runtime, cgroup_dirs, check_controllers, choose

MONITOR_LOG = "monitor.log"
START_TIMEOUT = 60.0
POLL = 0.05


def check_spec(spec: MachineSpec) -> None:
    """Spec fields a container cannot honour are errors, not silently ignored."""
    unused = [
        ("kernel", spec.kernel is not None), ("initrd", spec.initrd is not None), ("cmdline", spec.cmdline is not None),
        ("disks", bool(spec.disks)), ("network.forwards", bool(spec.network.forwards)),
        ("libvirt", spec.libvirt != LibvirtSpec()),
        ("memory_merge", spec.memory_merge),
    ]
    for field, given in unused:
        if given:
            raise VmctlError(f"{spec.source or spec.name}: {field}: not supported with backend: container "
                             f"(see docs/containers.md)")


class ContainerBackend:
    name = "container"

    def start(self, store: StateStore, spec: MachineSpec, spec_file: str | None) -> MachineRecord:
        check_spec(spec)
        runtime = choose()
        check_controllers()
        image, proc = _oci_image(spec)
        lower = str(base_tree(spec.image))  # an OCI image's layers are one colon-separated lowerdir
        container_id = f"vmctl-{spec.name}-{uuid.uuid4().hex[:8]}"
        record = MachineRecord(
            name=spec.name, backend=self.name, spec_file=spec_file, ephemeral=spec.ephemeral,
            plan=ContainerRecord(cpus=spec.cpus, memory=spec.memory, runtime=runtime.name, container_id=container_id,
                                 image=spec.image, command=tuple(spec.command), environment=dict(spec.environment),
                                 network_mode=spec.network.mode),
            resources={"container": [container_id], "cgroup": [f"/{CGROUP_PARENT}/{container_id}"]},
        )
        folder = store.create(record)
        plan = Plan(spec.name, container_id, runtime.name, runtime.binary, lower, spec.network.mode)
        where = paths(folder)
        monitor: subprocess.Popen | None = None
        try:
            if image is not None:  # the store keeps these layers while the machine exists
                from ...oci.store import USES_FILE

                (folder / USES_FILE).write_text(json.dumps({"image": image.ref, "diff_ids": image.diff_ids}))
            (folder / PLAN).write_text(json.dumps(asdict(plan), indent=2))
            where["bundle"].mkdir()
            config = build_config(spec, str(where["rootfs"] / "merged"), f"/{CGROUP_PARENT}/{container_id}", process=proc)
            (where["bundle"] / "config.json").write_text(json.dumps(config, indent=2))
            monitor = _launch(store, record, folder)
        except BaseException:
            if monitor is not None and monitor.poll() is None:
                monitor.kill()
                monitor.wait()
            release(folder, plan)
            store.delete(spec.name)  # nothing half-made stays behind
            raise
        return record

    def restart(self, store: StateStore, record: MachineRecord) -> None:
        """`vmctl start`: the stopped container again, on its own upper layer (its files
        are kept from the last run: only `vmctl rm` deletes them)."""
        folder = store.folder(record.name)
        plan = Plan.load(folder)
        for leftover in (OUTCOME, "stopped"):
            (folder / leftover).unlink(missing_ok=True)
        if (folder / CONSOLE).exists():  # the last run's READY must not count for this one
            (folder / CONSOLE).replace(folder / f"{CONSOLE}.1")
        monitor: subprocess.Popen | None = None
        try:
            monitor = _launch(store, record, folder)
        except BaseException:
            if monitor is not None and monitor.poll() is None:
                monitor.kill()
                monitor.wait()
            release(folder, plan)
            raise

    def wait_ready(self, store: StateStore, record: MachineRecord, timeout: float) -> float:
        """A started container is ready (its command runs); this only confirms it, and
        fails like a VM would if it already ended unsuccessfully."""
        start = time.monotonic()
        console = MarkerScan(store.folder(record.name) / CONSOLE, READY_MARKER_BYTES)
        while time.monotonic() - start < timeout:
            outcome = store.outcome(record.name)
            if outcome is not None and outcome["exit_code"] != 0:
                raise VmctlError(f"{record.name}: container ended: {outcome['reason']} (vmctl logs {record.name})")
            if console.found():
                return time.monotonic() - start
            signals.check()  # a signal whose exception Python dropped
            time.sleep(POLL)
        raise VmctlError(f"{record.name}: not ready after {timeout:g} s (vmctl logs {record.name})")

    def status(self, store: StateStore, record: MachineRecord) -> MachineStatus:
        _adopt(store, record)
        _reap_monitor(record)
        gone = "the container's init is gone without an outcome (its monitor was killed?)"
        status = process_status(self.name, store, record, link="veth", running=_rec(record).runtime, gone=gone)
        if status.state != "dead":
            return status
        # The init just ended (perhaps between process_status's outcome check and its pid
        # check, which a loaded host makes likely): its monitor is writing the outcome. A record
        # saved before the monitor's pid was known learns it from the monitor's own pid file.
        _learn_monitor_pid(store, record)
        if _monitor_alive(record):
            _wait_monitor(record, 10.0)
        _wait_outcome(store, record, OUTCOME_GRACE)
        return process_status(self.name, store, record, link="veth", running=_rec(record).runtime, gone=gone)

    def stop(self, store: StateStore, record: MachineRecord, timeout: float, plan: Plan | None = None) -> None:
        """SIGTERM to the container's init, SIGKILL after `timeout` s (`plan`: container.json,
        when the caller has read it already)."""
        folder = store.folder(record.name)
        _adopt(store, record)
        plan = plan or _plan(folder, record)
        runtime = Runtime(plan.runtime, plan.binary)
        oci = paths(folder)["oci"]
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            if not pid_alive(record.pid):
                break
            try:
                runtime.kill(record.name, oci, plan.container_id, sig)
            except VmctlError:
                send_signal(record.pid, sig)  # the runtime lost its state: signal the init directly
            deadline = time.monotonic() + wait
            while pid_alive(record.pid) and time.monotonic() < deadline:
                time.sleep(POLL)
        _wait_monitor(record, 10.0)
        if store.outcome(record.name) is None and not pid_alive(record.pid) and not _monitor_alive(record):
            # The monitor was gone (killed): nobody recorded the end or released the rest.
            (folder / OUTCOME).write_text(json.dumps({"exit_code": None, "crashed": False,
                                                      "reason": "stopped by vmctl (its monitor was gone)"}))
            release(folder, plan)

    def exec(self, store: StateStore, record: MachineRecord, command: list[str], timeout: float,
             stdin: bytes | None = None) -> ExecResult:
        """`<runtime> exec`: same namespaces, cgroup, capabilities and seccomp as the init."""
        _adopt(store, record)
        if not pid_alive(record.pid) or store.outcome(record.name) is not None:
            raise VmctlError(f"{record.name}: not running")
        folder = store.folder(record.name)
        plan = _plan(folder, record)
        script = exec_script(command, _rec(record).environment)
        return Runtime(plan.runtime, plan.binary).exec(record.name, paths(folder)["oci"], plan.container_id,
                                                        ["/bin/sh", "-c", script], timeout,
                                                        stdin=stdin)

    def usage(self, store: StateStore, record: MachineRecord) -> Usage:
        """The container's cgroup processes plus vmctl's monitor, and its overlay upper dir."""
        folder = store.folder(record.name)
        plan = _plan(folder, record)
        pids: set[int] = set()
        for path in cgroup_dirs(plan.container_id):
            try:
                pids.update(int(p) for p in (path / "cgroup.procs").read_text().split())
            except OSError:
                continue
        monitor = _monitor_pid(record)
        helpers = (monitor,) if monitor is not None and pid_alive(monitor) else ()
        pids.update(helpers)
        return Usage(tuple(sorted(pids)), allocated_bytes(paths(folder)["rootfs"] / "upper"),
                     helper_pids=helpers, runner=plan.runtime)

    def ssh_target(self, store: StateStore, record: MachineRecord, probe: bool = True) -> SshTarget | None:
        return ssh_target(store, record, probe)  # None: containers have no ssh access of their own

    def remove(self, store: StateStore, record: MachineRecord) -> None:
        folder = store.folder(record.name)
        _adopt(store, record)
        if (folder / PLAN).exists():
            plan = _plan(folder, record)  # read once: a corrupt one is rebuilt (and warned about) once
            self.stop(store, record, timeout=5, plan=plan)
            send_signal(_monitor_pid(record), signal.SIGKILL)
            problems = release(folder, plan)
            if problems:  # never delete the folder through a mount that is still there
                raise VmctlError(f"{record.name}: not removed: {'; '.join(problems)}")
        from ...net.host import sweep_stale_rules

        sweep_stale_rules()  # the NAT rule of a container whose monitor was killed
        store.delete(record.name)


def _plan(folder: Path, record: MachineRecord) -> Plan:
    """container.json; when it is corrupt or truncated, the same plan rebuilt from the
    machine record (container id, runtime, image), so stop and rm still release everything."""
    try:
        return Plan.load(folder)
    except (ValueError, TypeError) as error:
        rec = _rec(record)
        binary = shutil.which(rec.runtime) or rec.runtime
        try:
            from .layer_snapshots import stacked

            lower = stacked(rec.layers, str(base_tree(rec.image)))
        except VmctlError:
            lower = ""  # only the mount point matters to unmount it
        print(f"vmctl: warning: {folder / PLAN}: unreadable ({error}); using machine.json", file=sys.stderr)
        return Plan(record.name, rec.container_id, rec.runtime, binary, lower, rec.network_mode)


def _oci_image(spec: MachineSpec):
    """(image, process) for `image: oci:…`, (None, None) for a reference profile."""
    from ...oci.runconfig import is_oci, open_image, process

    if not is_oci(spec.image):
        return None, None
    image = open_image(spec.image)
    return image, process(image, spec.command, spec.environment)


def _launch(store: StateStore, record: MachineRecord, folder: Path) -> subprocess.Popen:
    """Start the container's monitor (it mounts the root, creates and starts the container)
    and wait for its report; the record gets the container's init pid."""
    read_end, write_end = os.pipe()
    monitor: subprocess.Popen | None = None
    try:
        with open(folder / MONITOR_LOG, "ab") as log:
            monitor = subprocess.Popen(
                [sys.executable, "-m", "vmctl.backends.container.monitor", str(folder), str(write_end)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(write_end,),
                start_new_session=True,  # a Ctrl-C on `vmctl up` must not kill it later
            )
        os.close(write_end)
        write_end = -1
        report = _read_report(read_end, START_TIMEOUT)
    except BaseException:
        if monitor is not None and monitor.poll() is None:
            monitor.kill()
            monitor.wait()
        raise
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    if not report.startswith("ok "):
        if monitor.poll() is None:
            monitor.kill()
            monitor.wait()
        detail = report[len("error "):] if report.startswith("error ") else _tail(folder / MONITOR_LOG)
        raise VmctlError(detail or f"{record.name}: the container monitor ended without a report")
    record.pid = int(report.split()[1])
    record.plan = dataclasses.replace(_rec(record), monitor_pid=monitor.pid)
    store.save(record)
    return monitor


def _read_report(fd: int, timeout: float) -> str:
    """The monitor's one line, or "" if it closed the pipe (died) or said nothing in time."""
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise VmctlError(f"the container monitor did not report within {timeout:g} s")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return ""
    return lines[-1] if lines else ""


def _adopt(store: StateStore, record: MachineRecord) -> None:
    """A record without pids is a `vmctl up` killed between the monitor's report and saving
    the record: take the init's pid from the runtime's pid file and the monitor's from its
    own, so `ps` tells the truth (running) and `rm` finds everything."""
    if record.pid is not None or not isinstance(record.plan, ContainerRecord):
        return
    folder = store.folder(record.name)

    def monitor(pid: int) -> None:
        if _rec(record).monitor_pid is None:
            record.plan = dataclasses.replace(_rec(record), monitor_pid=pid)

    for name, apply in ((paths(folder)["pid"].name, lambda pid: setattr(record, "pid", pid)), (MONITOR_PID, monitor)):
        try:
            apply(int((folder / name).read_text().strip()))
        except (OSError, ValueError):
            pass


def _rec(record: MachineRecord) -> ContainerRecord:
    return record.plan_as(ContainerRecord)


def _monitor_pid(record: MachineRecord) -> int | None:
    return _rec(record).monitor_pid if isinstance(record.plan, ContainerRecord) else None


def _learn_monitor_pid(store: StateStore, record: MachineRecord) -> None:
    if not isinstance(record.plan, ContainerRecord) or record.plan.monitor_pid is not None:
        return
    try:
        pid = int((store.folder(record.name) / MONITOR_PID).read_text().strip())
    except (OSError, ValueError):
        return
    record.plan = dataclasses.replace(record.plan, monitor_pid=pid)


# How long an outcome may take to appear after the init ended (the monitor must be scheduled,
# reap it and write the file): 2 s was too short on a loaded CI host, where a quick `vmctl run`
# was reported dead without an outcome. Only a monitor that really died costs the whole wait.
OUTCOME_GRACE = 10.0


def _wait_outcome(store: StateStore, record: MachineRecord, timeout: float) -> None:
    """A short grace for an outcome being written as its writer exits."""
    deadline = time.monotonic() + timeout
    while store.outcome(record.name) is None and time.monotonic() < deadline:
        time.sleep(POLL)


def _monitor_alive(record: MachineRecord) -> bool:
    _reap_monitor(record)
    return pid_alive(_monitor_pid(record))


def _wait_monitor(record: MachineRecord, timeout: float) -> None:
    """The monitor writes the outcome and releases the mount etc. once the init is gone."""
    deadline = time.monotonic() + timeout
    while _monitor_alive(record) and time.monotonic() < deadline:
        time.sleep(POLL)


def _reap_monitor(record: MachineRecord) -> None:
    """Collect the monitor's exit status if it is our child (in a long-lived process such
    as pytest), so it does not linger as a zombie."""
    reap(_monitor_pid(record))

