"""`vmctl cp`: files and trees into and out of a running guest as one tar stream.

Recursive, with modes, symlinks and (as root) owners. The stream takes the fastest way the
machine offers:
- **ssh**: the guest's sshd (a machine on vmctl's network with sshd): `tar -x`/`tar -c` in the
  guest with the archive streamed through the SSH channel's stdin/stdout;
- **share**: the native VMM's private transfer folder, a virtio-fs share every kvm machine
  mounts at /run/vmctl/xfer: the host writes (or reads) the archive there as a stream and the
  guest's tar reads (or writes) it through virtio-fs; only the command goes over the agent;
- **agent**: any other machine: the archive in base64 pieces through `exec` (slow: the
  agent's line protocol, over a UART on libvirt; kept as the fallback that works everywhere).

What comes out of a guest is extracted with tarfile's `tar` filter (no absolute paths,
nothing outside the destination, nothing written through a link) but keeping permission
bits except setuid/setgid.
"""

from __future__ import annotations

import base64
import os
import posixpath
import shlex
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

from .errors import VmctlError
from .guest_contract import XFER_DIR, XFER_GUEST, XFER_TAG, ExecResult  # noqa: F401 (re-exported)

AGENT_CHUNK = 24 * 1024  # base64 twice stays under the UART line buffer (see vmctl.testing)


@dataclass(frozen=True)
class Channel:
    """How to reach one guest: `exec(script, timeout)`, and the fast paths it has."""

    exec: Callable[[str, float], ExecResult]
    ssh: tuple[str, str, Path | None] | None = None  # host, user, key
    xfer: Path | None = None  # host side of the transfer share

    @property
    def kind(self) -> str:
        return "ssh" if self.ssh else "share" if self.xfer else "agent"


# Is the transfer share mounted in the guest? (Not with a kernel without virtio-fs, or an
# /init that does not mount it: then the agent path is used.)
_XFER_CHECK = f"grep -q ' {XFER_GUEST} virtiofs ' /proc/mounts && echo xfer; true"


def _with_share(channel: Channel, probe: str) -> Channel:
    if channel.xfer is not None and "xfer" not in probe.split():
        return Channel(channel.exec, channel.ssh, None)
    return channel


def _run(channel: Channel, script: str, timeout: float, what: str) -> str:
    result = channel.exec(script, timeout)
    if result.exit_code != 0:
        raise VmctlError(f"{what}: {result.stderr.decode(errors='replace').strip() or f'exit {result.exit_code}'}")
    return result.stdout.decode(errors="replace")


def _keep_modes(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
    safe = tarfile.tar_filter(member, path)
    if safe is None or member.mode is None:
        return safe
    return safe.replace(mode=member.mode & 0o1777, deep=False)


# --- into the guest ---------------------------------------------------------------------

def copy_in(channel: Channel, sources: list[Path], dest: str, timeout: float = 300) -> str:
    """Copy host files/trees into the guest at `dest` (like cp -a / docker cp): into `dest` when
    it is a directory in the guest (or when several sources are given), else as `dest`."""
    for source in sources:
        if not os.path.lexists(source):
            raise VmctlError(f"{source}: no such file or directory")
    probe = _run(channel, f"if [ -d {shlex.quote(dest)} ]; then echo dir; fi; {_XFER_CHECK}", timeout, f"cp: {dest}")
    is_dir = "dir" in probe.split()
    channel = _with_share(channel, probe)
    if is_dir or len(sources) > 1 or dest.endswith("/"):
        target_dir, names = dest, [Path(s).name for s in sources]
    else:
        target_dir, names = posixpath.dirname(dest.rstrip("/")) or "/", [posixpath.basename(dest.rstrip("/"))]

    def write(out: IO[bytes]) -> None:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for source, name in zip(sources, names):
                tar.add(str(source), arcname=name, recursive=True)

    untar = f"mkdir -p {shlex.quote(target_dir)} && tar -C {shlex.quote(target_dir)} -xpf"
    if channel.ssh:
        _ssh_stream(channel.ssh, f"{untar} -", timeout, write=write)
    elif channel.xfer:
        name = f"in-{uuid.uuid4().hex}.tar"
        try:
            with open(channel.xfer / name, "wb") as out:
                write(out)
            _run(channel, f"{untar} {XFER_GUEST}/{name}", timeout, f"cp into {dest}")
        finally:
            (channel.xfer / name).unlink(missing_ok=True)
    else:
        import io

        buffer = io.BytesIO()
        write(buffer)
        staging = f"/tmp/.vmctl-cp-{uuid.uuid4().hex}.tar"
        payload = buffer.getvalue()
        _run(channel, f": > {staging}", timeout, "cp: staging file")
        for start in range(0, len(payload), AGENT_CHUNK):
            piece = base64.b64encode(payload[start : start + AGENT_CHUNK]).decode()
            _run(channel, f"echo {piece} | base64 -d >> {staging}", timeout, "cp: staging file")
        _run(channel, f"{untar} {staging}; s=$?; rm -f {staging}; exit $s", timeout, f"cp into {dest}")
    return channel.kind


# --- out of the guest -------------------------------------------------------------------

def copy_out(channel: Channel, source: str, dest: Path, timeout: float = 300) -> str:
    """Copy a guest file/tree to the host: into `dest` when it is a directory, else as `dest`."""
    source = source.rstrip("/") or "/"
    parent, name = posixpath.dirname(source) or "/", posixpath.basename(source)
    if not name:
        raise VmctlError("cp: copy a directory out of the guest by name, not /")
    dest = Path(dest)
    if dest.is_dir():
        root, rename = dest, None
    else:
        if not dest.parent.is_dir():
            raise VmctlError(f"{dest.parent}: no such directory")
        root, rename = dest.parent, dest.name

    def read(stream: IO[bytes]) -> None:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if rename is not None:
                    first, _, rest = member.name.partition("/")
                    if first != name:
                        raise VmctlError(f"cp: unexpected member {member.name!r} in the guest's archive")
                    member.name = f"{rename}/{rest}" if rest else rename
                tar.extract(member, str(root), filter=_keep_modes, set_attrs=True)

    tar_c = f"tar -C {shlex.quote(parent)} -cf"
    if not channel.ssh and channel.xfer:
        channel = _with_share(channel, _run(channel, _XFER_CHECK, timeout, "cp: transfer share"))
    if channel.ssh:
        _ssh_stream(channel.ssh, f"{tar_c} - {shlex.quote(name)}", timeout, read=read)
    elif channel.xfer:
        archive = f"out-{uuid.uuid4().hex}.tar"
        try:
            _run(channel, _reblocked(lambda fifo: f"{tar_c} {fifo} {shlex.quote(name)}", f"{XFER_GUEST}/{archive}"),
                 timeout, f"cp from {source}")
            with open(channel.xfer / archive, "rb") as stream:
                read(stream)
        finally:
            (channel.xfer / archive).unlink(missing_ok=True)
    else:
        import io

        staging = f"/tmp/.vmctl-cp-{uuid.uuid4().hex}.tar"
        out = _run(channel, f"{tar_c} {staging} {shlex.quote(name)} && base64 {staging}; s=$?; rm -f {staging}; exit $s",
                   timeout, f"cp from {source}")
        read(io.BytesIO(base64.b64decode(out)))
    return channel.kind


def _reblocked(tar: Callable[[str], str], target: str) -> str:
    """A guest script: `tar(archive)` writes `target` in 1 MiB writes. tar itself
    writes 10 KiB (GNU) or 64 KiB (busybox's sendfile) at a time, and each write into the
    transfer share is one virtio-fs request (a VM exit and a trip through the VMM); dd
    re-blocks the stream to the server's max_write. A fifo, not a pipe, so that tar's exit
    status is kept (dash has no pipefail)."""
    fifo = f"/tmp/.vmctl-cp-{uuid.uuid4().hex}"
    return (f"mkfifo {fifo} || exit 1; {tar(fifo)} & "
            f"dd of={target} ibs=64k obs=1M 2>/dev/null < {fifo}; d=$?; [ $d -eq 0 ] || kill $! 2>/dev/null; "
            f"wait $!; t=$?; rm -f {fifo}; [ $d -ne 0 ] && exit $d; exit $t")


def _ssh_stream(target: tuple[str, str, Path | None], command: str, timeout: float,
                write: Callable[[IO[bytes]], None] | None = None, read: Callable[[IO[bytes]], None] | None = None) -> None:
    """Run `command` over SSH, streaming the archive into its stdin or out of its stdout."""
    import paramiko

    from .ssh import CONNECT_TIMEOUT

    host, user, key = target
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    try:
        client.connect(host, username=user, key_filename=str(key) if key else None, look_for_keys=key is None,
                       allow_agent=key is None, timeout=CONNECT_TIMEOUT, banner_timeout=CONNECT_TIMEOUT * 2,
                       auth_timeout=CONNECT_TIMEOUT * 2)
        stdin, stdout, stderr = client.exec_command(command, timeout=timeout, bufsize=1 << 20)
        if write is not None:
            write(stdin)  # type: ignore[arg-type]  # paramiko's channel files are binary file objects
            stdin.flush()
            stdin.channel.shutdown_write()
        else:
            stdin.channel.shutdown_write()
            read(stdout)  # type: ignore[arg-type]
        stdout.read()
        err = stderr.read().decode(errors="replace").strip()
        if stdout.channel.recv_exit_status() != 0:
            raise VmctlError(f"cp: {command.split(' &&')[0]}: {err or 'failed'}")
    except (paramiko.SSHException, OSError) as error:
        raise VmctlError(f"cp over ssh {user}@{host}: {error}") from None
    finally:
        client.close()


def channel_for(store, record) -> Channel:
    """The ways to reach a recorded machine (`store`: StateStore, `record`: MachineRecord)."""
    from .backends import get_backend

    backend = get_backend(record.backend)

    def run(script: str, timeout: float) -> ExecResult:
        return backend.exec(store, record, ["/bin/sh", "-c", script], timeout)

    target = getattr(backend, "ssh_target", None)
    ssh = target(store, record) if target else None
    xfer = store.folder(record.name) / XFER_DIR
    return Channel(run, ssh, xfer if xfer.is_dir() else None)
