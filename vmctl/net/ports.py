"""Host ports for forwards: is one free, before a machine is started."""

from __future__ import annotations

import socket

from ..errors import VmctlError


def port_free(port: int, protocol: str = "tcp", address: str = "127.0.0.1") -> bool:
    """Can we listen on `address`:`port`? (The VMM binds it for real a moment later.)"""
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


def check_forwards(source: str, forwards) -> None:
    """One-line error naming the spec line for a fixed host port that is taken."""
    for forward in forwards:
        if forward.host_port and not port_free(forward.host_port, forward.protocol):
            raise VmctlError(f"{source}: network.forwards: host port {forward.host_port}/{forward.protocol} is taken "
                             f"(0:{forward.guest_port} picks a free one)")
