"""The `libvirt` backend: the same machine spec, run by libvirt (QEMU) instead of our VMM.

Each machine is a libvirt domain named `vmctl-<name>`: persistent (defined, then started) or,
for an ephemeral machine, transient (gone when it stops). Its state folder holds the domain
XML, the console log (local URIs) and the qcow2 overlays (local URIs; remote URIs keep them in
a `vmctl` storage pool on the other host).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import tempfile
import time
import uuid as uuid_module
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ...errors import VmctlError
from ...guest_contract import ExecResult, exec_script, exit_code_in
from ...machine_files import AGENT_TRANSPORT
from ...plans import LibvirtRecord, SshAccess
from ...proc import allocated_bytes, write_json_atomic
from ...spec.model import MachineSpec
from ...state import CONSOLE, NETWORK, OUTCOME, MachineRecord, StateStore
from ...vmm.agent import UART, VIRTIO_CONSOLE, console_wanted
from ..base import (
    MachineStatus,
    SshTarget,
    Usage,
    ended_status,
    exec_over_ssh,
    exec_with_input,
    ready_marker,
    setup_failure,
    ssh_target,
)
from .agent_ports import GuestAgent
from .connection import connect, is_remote, libvirt_module, message, not_found, translated
from .disks import POOL_PATH, RemoteDisks, local_disks
from .domain_xml import render
from .plan import (
    boot_for,
    check_network,
    default_mac,
    domain_name,
    domain_plan,
    root_image,
    uses_vmctl_tap,
)

DOMAIN_XML = "domain.xml"
STOPPED = "stopped"  # marker file of `vmctl stop`: shut off on purpose, to be started again
POLL = 0.1
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes


# libvirt's VIR_DOMAIN_SHUTOFF_* reasons, as `ps` shows them.
SHUTOFF_REASONS = {1: "shut down", 2: "stopped (destroyed)", 3: "crashed", 5: "saved", 6: "start failed",
                   7: "restored from a snapshot", 8: "ended in a daemon failover"}


def domain_type_for(uri: str, wanted: str) -> str:
    """The test driver only knows its own domain type."""
    return "test" if urlsplit(uri).scheme.startswith("test") else wanted


class LibvirtBackend:
    name = "libvirt"

    def __init__(self) -> None:
        # One connection per URI for the backend's lifetime (test:///default keeps its state
        # only while a connection is open).
        self._connections: dict[str, Any] = {}

    def _conn(self, uri: str, machine: str) -> Any:
        conn = self._connections.get(uri)
        if conn is None or not conn.isAlive():
            conn = self._connections[uri] = connect(uri, machine)
        return conn

    def close(self) -> None:
        for conn in self._connections.values():
            try:
                conn.close()
            except Exception:  # already closed by the peer: nothing left to release
                pass
        self._connections.clear()

    # start ---------------------------------------------------------------------------------

    def start(self, store: StateStore, spec: MachineSpec, spec_file: str | None) -> MachineRecord:
        settings = spec.libvirt
        uri, remote = settings.uri, is_remote(settings.uri)
        firmware_boot = spec.kernel is None and bool(spec.disks) and spec.image == "busybox"  # its own disk, maybe not Linux
        if not remote and not firmware_boot and domain_type_for(uri, settings.domain_type) == "kvm":
            from ...host_probe import linux_guest_problem

            # QEMU/KVM on this host's /dev/kvm: the same limit as the native VMM, said before
            # anything is made (otherwise the guest stops with an emulation failure minutes later)
            if problem := linux_guest_problem(spec.kernel):
                raise VmctlError(f"{spec.name}: backend libvirt ({uri}, domain type kvm): {problem}")
        name = domain_name(spec.name)
        record = MachineRecord(
            name=spec.name, backend=self.name, spec_file=spec_file, ephemeral=spec.ephemeral,
            plan=LibvirtRecord(cpus=spec.cpus, memory=spec.memory, uri=uri, domain=name, uuid=str(uuid_module.uuid4()),
                               remote=remote, persistent=not spec.ephemeral, environment=dict(spec.environment),
                               image=spec.image),
        )
        folder = store.create(record)
        remote_disks: RemoteDisks | None = None
        conn = None
        try:
            conn = self._conn(uri, spec.name)
            self._check_name_free(conn, spec.name, name, uri)
            vmctl_tap = uses_vmctl_tap(spec, remote)
            check_network(spec, vmctl_tap)  # spec mistakes before anything is made
            boot_for(spec)
            root = root_image(spec)
            if remote and spec.kernel is None and spec.image.startswith("oci:"):
                raise VmctlError(f"{spec.name}: image {spec.image}: OCI images run on a local libvirt only "
                                 f"(their layer disks are in this host's store)")
            if remote and root:
                raise VmctlError(f"{spec.name}: image {spec.image} boots from a root disk, which only a local "
                                 f"libvirt gets (give kernel and disks for {uri})")
            extra_words: tuple[str, ...] = ()
            tap = None
            if vmctl_tap:
                tap, extra_words = self._vmctl_network(spec, folder, record)
            with translated(spec.name, f"preparing disks on {uri}"):
                if remote:
                    remote_disks = RemoteDisks(conn, spec.name, settings.upload)
                    remote_disks.pool()  # the console log lives in the pool's folder too
                    disks = remote_disks.disks(spec, name)
                else:
                    disks = local_disks(spec, folder, root)
            console = f"{POOL_PATH}/{name}.console.log" if remote else str(folder / CONSOLE)
            agent = None if remote else self._agent_path(folder, _rec(record).uuid)
            # VMCTL_AGENT_CONSOLE=0 (as for the native VMM): no virtio console, the agent on COM2
            no_console = remote or not console_wanted()
            agent_console = None if no_console else self._agent_path(folder, _rec(record).uuid, "-hvc")
            plan = domain_plan(spec, uuid=_rec(record).uuid, domain_type=domain_type_for(uri, settings.domain_type),
                               disks=disks, console_log=console, agent_socket=agent, run_as=self._run_as(uri),
                               state_folder=str(folder), tap=tap, extra_words=extra_words, agent_console=agent_console)
            if remote and remote_disks is not None:
                for path in (plan.kernel, plan.initrd):
                    if path and remote_disks.find(path) is None:
                        raise VmctlError(f"{spec.name}: {path} does not exist on {uri} (copy it there)")
            xml = render(plan)
            (folder / DOMAIN_XML).write_text(xml)
            record.plan = dataclasses.replace(_rec(record), console=console, agent_socket=agent, agent_console=agent_console)
            record.resources = {"volumes": list(remote_disks.created) if remote_disks else []}
            store.save(record)
            if plan.nic is not None and plan.nic.kind == "network":
                self._network_up(conn, spec.name, plan.nic.source, uri)
            with translated(spec.name, f"starting domain {name} on {uri}"):
                if spec.ephemeral:
                    conn.createXML(xml, 0)  # transient: libvirt forgets it when it stops
                else:
                    conn.defineXML(xml).create()
            record.pid = self._qemu_pid(uri, name)
            store.save(record)
        except BaseException:
            self._discard(conn, record, remote_disks, store.network(spec.name))
            store.delete(spec.name)  # nothing half-made stays behind
            raise
        return record

    @staticmethod
    def _vmctl_network(spec: MachineSpec, folder: Path, record: MachineRecord) -> tuple[str, tuple[str, ...]]:
        """vmctl's own TAP and /30 (NAT for `nat`), handed to QEMU by name, and an SSH key:
        (the TAP's name, the guest's `ip=` and `vmctl.sshkey=` words). The network is saved
        in the state folder before anything else can fail, so a failed start removes it."""
        from ...guest_contract import InitArgs
        from ...net.host import HostNetwork
        from ..kvm_prepare import machine_keys

        host = HostNetwork(spec.network.mode, spec.network.mac or default_mac(spec.name)).open()
        ip_word = host.kernel_ip_parameter()
        network = host.detach()
        write_json_atomic(folder / NETWORK, network)
        from ...net.host import TAP_ALIAS, _ip

        _ip("link", "set", "dev", network["tap"], "alias", f"{TAP_ALIAS}{folder}")  # whose it is, for vmctl prune
        if spec.network.forwards:
            # QEMU has no relay of ours inside: a small detached process holds the host ports
            from ...vmm.forward import start_relay

            wanted = [(f.host_port, f.guest_port, f.protocol) for f in spec.network.forwards]
            network["forwards"], network["relay_pid"] = start_relay(network["guest_ip"], wanted, str(folder / "relay.log"))
            write_json_atomic(folder / NETWORK, network)
        private_key, keys = machine_keys(spec, folder)
        record.plan = dataclasses.replace(_rec(record), ssh=SshAccess(spec.ssh.user, private_key))
        return network["tap"], (ip_word, *InitArgs(sshkey="\n".join(keys)).words())

    def _check_name_free(self, conn: Any, machine: str, name: str, uri: str) -> None:
        libvirt = libvirt_module()
        try:
            conn.lookupByName(name)
        except libvirt.libvirtError as error:
            if not_found(error):
                return
            raise VmctlError(f"{machine}: looking up domain {name} on {uri}: {message(error)}") from None
        raise VmctlError(f"{machine}: a libvirt domain named {name} already exists on {uri} "
                         f"(remove it: virsh -c {uri} undefine {name})")

    def _network_up(self, conn: Any, machine: str, network: str, uri: str) -> None:
        libvirt = libvirt_module()
        try:
            net = conn.networkLookupByName(network)
        except libvirt.libvirtError as error:
            if not_found(error):
                raise VmctlError(f"{machine}: no libvirt network named {network!r} on {uri} "
                                 f"(virsh -c {uri} net-list --all)") from None
            raise
        if not net.isActive():
            with translated(machine, f"starting libvirt network {network!r} on {uri}"):
                net.create()

    @staticmethod
    def _agent_path(folder: Path, uuid: str, kind: str = "") -> str:
        """`kind` "": COM2's socket, "-hvc": the virtio console's."""
        path = folder / f"agent{kind}.sock"
        if len(str(path)) <= MAX_SOCKET_PATH:
            return str(path)
        return os.path.join(tempfile.gettempdir(), f"vmctl-agent-{uuid}{kind}.sock")

    @staticmethod
    def _run_as(uri: str) -> tuple[int, int] | None:
        parts = urlsplit(uri)
        if parts.scheme == "qemu" and parts.path == "/system" and not parts.hostname:
            return os.getuid(), os.getgid()
        return None

    @staticmethod
    def _qemu_pid(uri: str, name: str) -> int | None:
        if is_remote(uri) or not uri.startswith("qemu"):
            return None
        try:
            return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    # looking at a machine ----------------------------------------------------------------

    def _domain(self, record: MachineRecord) -> Any | None:
        """The machine's domain, or None when libvirt no longer has it."""
        conn = self._conn(_rec(record).uri, record.name)
        libvirt = libvirt_module()
        try:
            return conn.lookupByUUIDString(_rec(record).uuid)
        except libvirt.libvirtError as error:
            if not_found(error):
                return None
            raise VmctlError(f"{record.name}: looking up domain {_rec(record).domain}: {message(error)}") from None

    def _console(self, store: StateStore, record: MachineRecord) -> bytes:
        self._sync_console(store, record)
        try:
            return (store.folder(record.name) / CONSOLE).read_bytes()
        except FileNotFoundError:
            return b""

    def _sync_console(self, store: StateStore, record: MachineRecord) -> None:
        """Remote machines: copy the console log from the other host (a volume of the pool), so
        `vmctl logs` reads it where it reads every machine's."""
        if not _rec(record).remote:
            return
        libvirt = libvirt_module()
        conn = self._conn(_rec(record).uri, record.name)
        try:
            conn.storagePoolLookupByName("vmctl").refresh(0)
            volume = conn.storageVolLookupByPath(_rec(record).console)
            chunks: list[bytes] = []
            stream = conn.newStream(0)
            volume.download(stream, 0, 0, 0)
            stream.recvAll(lambda _stream, data, _opaque: chunks.append(data), None)
            stream.finish()
        except libvirt.libvirtError:
            return  # not created yet, or the host is away: keep the last copy
        target = store.folder(record.name) / CONSOLE
        temporary = target.with_suffix(".tmp")
        temporary.write_bytes(b"".join(chunks))
        os.replace(temporary, target)

    def status(self, store: StateStore, record: MachineRecord) -> MachineStatus:
        libvirt = libvirt_module()
        try:
            domain = self._domain(record)
        except VmctlError as error:
            return MachineStatus(record.name, self.name, "dead", None, str(error).split(": ", 1)[1])
        self._sync_console(store, record)  # so `vmctl logs` after `ps` shows a remote console
        if domain is not None:
            try:
                state, reason = domain.state()
            except libvirt.libvirtError:
                domain, state, reason = None, None, None
        if domain is not None and state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED,
                                            libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_SHUTDOWN):
            detail = "paused" if state == libvirt.VIR_DOMAIN_PAUSED else ""
            return MachineStatus(record.name, self.name, "running", record.pid, detail)
        if (store.folder(record.name) / STOPPED).exists():
            return MachineStatus(record.name, self.name, "stopped", None, "by vmctl stop (vmctl start boots it)")
        ended = ended_status(self.name, store, record)
        if ended is not None:
            return ended
        code = exit_code_in(self._console(store, record))
        if domain is None:
            if _rec(record).persistent:
                return MachineStatus(record.name, self.name, "dead", None,
                                     f"domain {_rec(record).domain} was undefined outside vmctl")
            if code is None:
                return MachineStatus(record.name, self.name, "crashed", None,
                                     "the guest ended without reporting an exit status")
            return MachineStatus(record.name, self.name, "exited", None, f"guest exited with status {code}", code)
        if state == libvirt.VIR_DOMAIN_CRASHED or (state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED):
            return MachineStatus(record.name, self.name, "crashed", None, "the guest crashed", code)
        if code is not None:
            detail = f"guest exited with status {code}"
        else:
            detail = SHUTOFF_REASONS.get(reason, "powered off")
        return MachineStatus(record.name, self.name, "exited", None, detail, code)

    def wait_ready(self, store: StateStore, record: MachineRecord, timeout: float) -> float:
        """Ready = the console shows VMCTL-READY, or the guest already ended successfully."""
        start = time.monotonic()
        marker = ready_marker(record)
        while time.monotonic() - start < timeout:
            console = self._console(store, record)
            if marker in console:
                return time.monotonic() - start
            status = self.status(store, record)
            if status.state != "running":
                if status.state == "exited" and status.exit_code == 0:
                    return time.monotonic() - start
                failed = setup_failure(console)
                if failed:
                    raise VmctlError(f"{record.name}: the guest's set-up failed: {failed} (vmctl rm {record.name})")
                raise VmctlError(f"{record.name}: guest ended before it was ready: {status.detail} "
                                 f"(vmctl logs {record.name})")
            time.sleep(POLL)
        raise VmctlError(f"{record.name}: not ready after {timeout:g} s (vmctl logs {record.name})")

    # stopping and removing ---------------------------------------------------------------

    def stop(self, store: StateStore, record: MachineRecord, timeout: float) -> None:
        """ACPI shutdown, then destroy after `timeout` seconds."""
        libvirt = libvirt_module()
        domain = self._domain(record)
        if domain is None or not domain.isActive():
            return
        self._sync_console(store, record)
        try:
            domain.shutdown()
        except libvirt.libvirtError:
            pass  # e.g. no ACPI in the guest: destroy below
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._active(domain):
            time.sleep(POLL)
        if self._active(domain):
            with translated(record.name, f"destroying domain {_rec(record).domain}"):
                try:
                    domain.destroy()
                except libvirt.libvirtError as error:
                    if not_found(error) or self._active(domain) is False:
                        return
                    raise
        self._sync_console(store, record)
        if not _rec(record).persistent:
            # A transient domain leaves nothing to ask afterwards: note how it ended.
            code = exit_code_in(self._console(store, record))
            outcome = {"exit_code": code, "reason": "stopped by vmctl", "crashed": False}
            write_json_atomic(store.folder(record.name) / OUTCOME, outcome)

    @staticmethod
    def _active(domain: Any) -> bool:
        try:
            return bool(domain.isActive())
        except libvirt_module().libvirtError:
            return False  # a transient domain vanished: not active

    def usage(self, store: StateStore, record: MachineRecord) -> Usage:
        """QEMU's process (local URIs) and the machine's own disks (its overlays)."""
        pid = self._qemu_pid(_rec(record).uri, _rec(record).domain)
        return Usage((pid,) if pid else (), allocated_bytes(store.folder(record.name) / "disks"))

    def restart(self, store: StateStore, record: MachineRecord) -> None:
        """`vmctl start`: the shut-off domain again (defined again from domain.xml if it was
        undefined outside vmctl), on its own overlays, their chains re-read from the files."""
        rec = _rec(record)
        if record.ephemeral:
            raise VmctlError(f"{record.name}: ephemeral: removed once it stops (vmctl up starts it anew)")
        conn = self._conn(rec.uri, record.name)
        folder = store.folder(record.name)
        domain = self._domain(record)
        if domain is not None and domain.isActive():
            raise VmctlError(f"{record.name}: already running")
        if domain is None:
            with translated(record.name, f"defining domain {rec.domain} again from {folder / DOMAIN_XML}"):
                domain = conn.defineXML((folder / DOMAIN_XML).read_text())
        if not rec.remote:
            from .disk_snapshots import Domains

            domains = Domains(self, store, record)
            domains.normalize()  # an overlay a live snapshot made gets its usual name back
            domains.sync_chains()
        for leftover in (OUTCOME, STOPPED, AGENT_TRANSPORT):
            (folder / leftover).unlink(missing_ok=True)
        if (folder / CONSOLE).exists():  # the last run's READY must not count for this one
            (folder / CONSOLE).replace(folder / f"{CONSOLE}.1")
        with translated(record.name, f"starting domain {rec.domain} on {rec.uri}"):
            domain.create()
        record.pid = self._qemu_pid(rec.uri, rec.domain)
        store.save(record)

    def remove(self, store: StateStore, record: MachineRecord) -> None:
        self.stop(store, record, timeout=5)
        conn = self._conn(_rec(record).uri, record.name)
        remote_disks = RemoteDisks(conn, record.name, False) if _rec(record).remote else None
        problems = self._discard(conn, record, remote_disks, store.network(record.name))
        if problems:
            raise VmctlError(f"{record.name}: could not remove everything: {'; '.join(problems)}")
        store.delete(record.name)

    def _discard(
        self, conn: Any, record: MachineRecord, remote_disks: RemoteDisks | None, network: dict | None,
    ) -> list[str]:
        """Undefine the domain, delete the remote volumes and vmctl's TAP (`network`, from
        network.json); the messages of what failed."""
        problems: list[str] = []
        if conn is None:
            return problems
        libvirt = libvirt_module()
        try:
            domain = conn.lookupByUUIDString(_rec(record).uuid)
            if domain.isActive():
                domain.destroy()
            if domain.isPersistent():
                domain.undefine()
        except libvirt.libvirtError as error:
            if not not_found(error):
                problems.append(f"domain {_rec(record).domain}: {message(error)}")
        if remote_disks is not None:
            volumes = list(record.resources.get("volumes", [])) + [v for v in remote_disks.created
                                                                   if v not in record.resources.get("volumes", [])]
            if _rec(record).console:
                volumes.append(_rec(record).console)
            try:
                remote_disks.pool()  # refreshed, so the console log is a volume we can delete
            except libvirt.libvirtError as error:
                problems.append(f"storage pool: {message(error)}")
            problems += remote_disks.delete(volumes)
        if network and network.get("relay_pid"):
            from ...proc import send_signal

            send_signal(network["relay_pid"], signal.SIGTERM)
        if network:
            from ...net.host import remove_detached

            remove_detached(network)  # the TAP QEMU had, and its NAT rule
        for agent in (_rec(record).agent_socket, _rec(record).agent_console):
            if agent and os.path.basename(agent).startswith("vmctl-agent-"):  # outside the state folder
                try:
                    os.unlink(agent)
                except FileNotFoundError:
                    pass
        return problems

    # exec -----------------------------------------------------------------------------------

    def exec(self, store: StateStore, record: MachineRecord, command: list[str], timeout: float,
             stdin: bytes | None = None) -> ExecResult:
        """Through SSH (paramiko) when the guest is on vmctl's network and its sshd answers,
        as for native guests; otherwise through the guest agent on its virtio console or COM2
        (local URIs; `agent.GuestAgent` finds which)."""
        if self.status(store, record).state != "running":
            raise VmctlError(f"{record.name}: not running")
        script = exec_script(command, _rec(record).environment)
        over_ssh = exec_over_ssh(store, record, script, timeout, stdin)
        if over_ssh is not None:
            return over_ssh
        agent = self.agent(store, record)
        if not agent.ports:
            raise VmctlError(f"{record.name}: exec needs the agent socket, which only a local libvirt has "
                             f"({_rec(record).uri} is remote)")
        return exec_with_input(lambda text: agent.exec(text, timeout), script, stdin)

    @staticmethod
    def agent(store: StateStore, record: MachineRecord) -> GuestAgent:
        """The guest agent's ports: the virtio console first (a page per VM exit), COM2."""
        rec = _rec(record)
        ports = tuple((transport, path) for transport, path in ((VIRTIO_CONSOLE, rec.agent_console),
                                                                (UART, rec.agent_socket)) if path)
        return GuestAgent(record.name, ports, store.folder(record.name) / AGENT_TRANSPORT, record.pid)

    def ssh_target(self, store: StateStore, record: MachineRecord, probe: bool = True) -> SshTarget | None:
        return ssh_target(store, record, probe)


def _rec(record: MachineRecord) -> LibvirtRecord:
    return record.plan_as(LibvirtRecord)
