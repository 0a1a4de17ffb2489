"""Port forwards host:port -> guest:port, relayed by the VMM process itself.

A relay in the VMM (not an iptables DNAT rule) dies with it, so a VMM killed with -9 leaves
no forwarding state behind. TCP: one thread pair per connection. UDP: one socket towards
the guest per client address, replies relayed back from it.
"""

from __future__ import annotations

import logging
import socket
import threading

from ..errors import VmctlError

log = logging.getLogger(__name__)
BIND_ADDRESS = "127.0.0.1"  # like Lima: forwarded ports are the host's own, not the LAN's
UDP_IDLE = 60.0


def listen(host_port: int, guest_port: int, protocol: str = "tcp") -> socket.socket:
    """The host socket of a forward (port 0: a free one), bound and listening."""
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((BIND_ADDRESS, host_port))
    except OSError as error:
        sock.close()
        raise VmctlError(f"port forward {host_port}:{guest_port}/{protocol}: cannot listen on "
                         f"{BIND_ADDRESS}:{host_port}: {error.strerror}") from None
    if protocol == "tcp":
        sock.listen(16)
    return sock


class Forwarder:
    def __init__(self, host_port: int, guest_ip: str, guest_port: int, protocol: str = "tcp",
                 sock: socket.socket | None = None) -> None:
        self.target = (guest_ip, guest_port)
        self.protocol = protocol
        self.sock = sock or listen(host_port, guest_port, protocol)
        self.port = self.sock.getsockname()[1]  # host_port 0: the free port the kernel picked
        self._closed = threading.Event()
        loop = self._accept_loop if protocol == "tcp" else self._udp_loop
        threading.Thread(target=loop, name=f"forward-{host_port}", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            guest = socket.create_connection(self.target, timeout=10)
        except OSError as error:
            log.info("forward to %s:%d: %s", *self.target, error)
            client.close()
            return
        guest.settimeout(None)
        back = threading.Thread(target=_pipe, args=(guest, client), daemon=True)
        back.start()
        _pipe(client, guest)
        back.join()
        client.close()
        guest.close()

    def _udp_loop(self) -> None:
        peers: dict[tuple, socket.socket] = {}
        while not self._closed.is_set():
            try:
                data, client = self.sock.recvfrom(65535)
            except OSError:
                return
            upstream = peers.get(client)
            if upstream is None:
                upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                upstream.connect(self.target)
                upstream.settimeout(UDP_IDLE)
                peers[client] = upstream
                threading.Thread(target=self._udp_replies, args=(upstream, client, peers), daemon=True).start()
            try:
                upstream.send(data)
            except OSError:
                pass

    def _udp_replies(self, upstream: socket.socket, client: tuple, peers: dict) -> None:
        with upstream:
            while not self._closed.is_set():
                try:
                    self.sock.sendto(upstream.recv(65535), client)
                except OSError:  # idle timeout, or closed
                    break
        peers.pop(client, None)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
            try:
                sock.shutdown(how)
            except OSError:
                pass


def start_relay(guest_ip: str, forwards: list[tuple[int, int, str]], log_path: str) -> tuple[list[list], int]:
    """Forwards for a guest no vmctl process hosts (libvirt's QEMU): the sockets are bound
    here (so a taken port fails now, and port 0 is known at once) and handed to a detached
    `python -m vmctl.vmm.forward` that relays until it is killed. ([[host, guest, proto]], pid)."""
    import subprocess
    import sys

    sockets = [listen(host, guest, proto) for host, guest, proto in forwards]
    try:
        argv = [sys.executable, "-m", "vmctl.vmm.forward", guest_ip]
        argv += [f"{s.fileno()}:{guest}:{proto}" for s, (_, guest, proto) in zip(sockets, forwards)]
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                       pass_fds=[s.fileno() for s in sockets], start_new_session=True)
        return [[s.getsockname()[1], guest, proto] for s, (_, guest, proto) in zip(sockets, forwards)], process.pid
    finally:
        for sock in sockets:
            sock.close()


def main(argv: list[str]) -> int:
    """`python -m vmctl.vmm.forward GUEST_IP FD:GUEST_PORT:PROTO...`: relay inherited sockets."""
    import signal

    guest_ip, specs = argv[0], argv[1:]
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})  # for sigwait, in every thread
    for spec in specs:
        fd, guest_port, protocol = spec.split(":")
        kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
        Forwarder(0, guest_ip, int(guest_port), protocol, socket.socket(socket.AF_INET, kind, fileno=int(fd)))
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
