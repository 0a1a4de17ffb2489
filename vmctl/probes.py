"""After a guest is up: `provision:` scripts (once), then `ready:` probes (each with a timeout
and a hint). Used by `vmctl up` and the pytest plugin, for every backend.

Provision output goes to the machine's console log, between marker lines, so
`vmctl logs NAME` shows it next to the boot; a failing script stops `up` with its exit code.
"""

from __future__ import annotations

import re
import shlex
import socket
import time
import urllib.error
import urllib.request
from typing import Callable

from .errors import VmctlError
from .spec.model import ProbeSpec, ProvisionSpec
from .state import CONSOLE, MachineRecord, StateStore

PROVISIONED = "provisioned"  # marker in the state folder: provisioning ran once
POLL = 0.25


def provision(store: StateStore, record: MachineRecord, scripts: tuple[ProvisionSpec, ...], timeout: float = 600) -> None:
    folder = store.folder(record.name)
    if not scripts or (folder / PROVISIONED).exists():
        return
    from .backends import get_backend

    backend = get_backend(record.backend)
    with open(folder / CONSOLE, "ab", buffering=0) as log:
        for index, step in enumerate(scripts):
            who = "" if step.user == "root" else f" as {step.user}"
            script = step.script if step.user == "root" else f"su -s /bin/sh {shlex.quote(step.user)} -c {shlex.quote(step.script)}"
            log.write(f"\n[vmctl provision {index + 1}/{len(scripts)}{who}]\n".encode())
            result = backend.exec(store, record, ["/bin/sh", "-c", script], timeout)
            log.write(result.stdout + result.stderr)
            log.write(f"[vmctl provision {index + 1}/{len(scripts)}: exit {result.exit_code}]\n".encode())
            if result.exit_code != 0:
                raise VmctlError(f"{record.name}: provision[{index}] failed with exit {result.exit_code} "
                                 f"(its output: vmctl logs {record.name})")
    (folder / PROVISIONED).write_text(f"{time.time()}\n")


def wait_ready(store: StateStore, record: MachineRecord, probes: tuple[ProbeSpec, ...]) -> float:
    """Wait for each probe in turn; the seconds it took. A probe that never becomes true is a
    one-line error naming its spec line, what was last seen, and its hint."""
    started = time.monotonic()
    for probe in probes:
        check = _checker(store, record, probe)
        deadline = time.monotonic() + probe.timeout
        last = "never checked"
        while True:
            ok, last = check(max(0.5, min(5.0, deadline - time.monotonic())))
            if ok:
                break
            if time.monotonic() >= deadline:
                hint = f"; hint: {probe.hint}" if probe.hint else ""
                raise VmctlError(f"{probe.source}: {record.name}: ready.{probe.kind} {probe.target!r} not true after "
                                 f"{probe.timeout:g} s ({last}){hint}")
            time.sleep(POLL)
    return time.monotonic() - started


def _address(store: StateStore, record: MachineRecord, probe: ProbeSpec) -> str:
    network = store.network(record.name)
    if not network or not network.get("guest_ip"):
        raise VmctlError(f"{probe.source}: {record.name}: ready.{probe.kind} needs the guest on vmctl's network")
    return network["guest_ip"]


def _checker(store: StateStore, record: MachineRecord, probe: ProbeSpec) -> Callable[[float], tuple[bool, str]]:
    if probe.kind == "log":
        pattern = re.compile(probe.target, re.MULTILINE)
        path = store.folder(record.name) / CONSOLE

        def log(_: float) -> tuple[bool, str]:
            text = path.read_text(errors="replace") if path.exists() else ""
            return bool(pattern.search(text)), "no such line in the console log"
        return log
    if probe.kind == "tcp":
        address = _address(store, record, probe)

        def tcp(timeout: float) -> tuple[bool, str]:
            try:
                with socket.create_connection((address, int(probe.target)), timeout=timeout):
                    return True, ""
            except OSError as error:
                return False, f"{address}:{probe.target}: {error.strerror or error}"
        return tcp
    if probe.kind == "http":
        url = probe.target.replace("{address}", _address(store, record, probe)) if "{address}" in probe.target else probe.target

        def http(timeout: float) -> tuple[bool, str]:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as answer:
                    status = answer.status
            except urllib.error.HTTPError as error:
                status = error.code
            except (OSError, ValueError) as error:
                return False, f"{url}: {getattr(error, 'reason', error)}"
            return status == probe.status, f"{url} answered {status}"
        return http
    from .backends import get_backend

    backend = get_backend(record.backend)

    def command(timeout: float) -> tuple[bool, str]:
        try:
            result = backend.exec(store, record, ["/bin/sh", "-c", probe.target], max(timeout, 10))
        except VmctlError as error:
            return False, str(error)
        return result.exit_code == 0, f"exit {result.exit_code}"
    return command
