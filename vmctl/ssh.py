"""SSH to guests: a key pair per machine, command execution with paramiko, `vmctl ssh` argv.

Each machine gets its own Ed25519 key pair in its state folder (made with `cryptography`,
which paramiko already depends on): the public half goes to the guest through /init's
`vmctl.sshkey=`, the private half never leaves the host and is deleted with the machine.
Host keys are not checked: every guest makes fresh ones at boot, and the guest is reached
over its own point-to-point TAP link.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import VmctlError
from .guest_contract import ExecResult

PRIVATE_KEY = "id_ed25519"
CONNECT_TIMEOUT = 5.0
CONNECT_ATTEMPTS = 3


@dataclass(frozen=True)
class KeyPair:
    private: Path
    public: str  # one authorized_keys line


def generate_key(folder: Path, comment: str) -> KeyPair:
    """A new Ed25519 key pair: `folder/id_ed25519` (0600) and `.pub`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PRIVATE_KEY
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    line = f"{public.decode()} {comment}"
    (folder / f"{PRIVATE_KEY}.pub").write_text(line + "\n")
    return KeyPair(path, line)


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def exec_ssh(host: str, user: str, key: Path | None, command: str, timeout: float, port: int = 22,
             stdin: bytes | None = None) -> ExecResult:
    """Run `command` through the guest's sshd; its exit code, stdout and stderr. It reads
    `stdin`, then EOF (none: EOF at once, like /dev/null)."""
    import paramiko

    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # fresh host keys every boot
    try:
        for attempt in range(CONNECT_ATTEMPTS):
            # A slow guest's sshd sometimes drops a connection during key exchange ("No
            # existing session"); nothing ran yet, so connecting again is safe.
            try:
                client.connect(host, port=port, username=user, key_filename=str(key) if key else None,
                               look_for_keys=key is None, allow_agent=key is None, timeout=CONNECT_TIMEOUT,
                               banner_timeout=CONNECT_TIMEOUT * 2, auth_timeout=CONNECT_TIMEOUT * 2)
                break
            except paramiko.AuthenticationException:
                raise
            except (paramiko.SSHException, OSError):
                client.close()
                if attempt == CONNECT_ATTEMPTS - 1:
                    raise
                time.sleep(1.0)
        _, stdout, stderr = client.exec_command(command, timeout=timeout)
        if stdin:
            stdout.channel.sendall(stdin)
        stdout.channel.shutdown_write()
        out = stdout.read()
        err = stderr.read()
        return ExecResult(stdout.channel.recv_exit_status(), out, err)
    except (paramiko.SSHException, OSError) as error:
        raise VmctlError(f"ssh {user}@{host}: {error}") from None
    finally:
        client.close()


def ssh_argv(host: str, user: str, key: Path | None, extra: list[str]) -> list[str]:
    """The OpenSSH client command line `vmctl ssh` runs."""
    argv = ["ssh", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    if key is not None:
        argv += ["-i", str(key), "-o", "IdentitiesOnly=yes"]
    return argv + [f"{user}@{host}", *extra]
