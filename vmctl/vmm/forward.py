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


class Forwarder:
    def __init__(self, host_port: int, guest_ip: str, guest_port: int, protocol: str = "tcp") -> None:
        self.target = (guest_ip, guest_port)
        self.protocol = protocol
        kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((BIND_ADDRESS, host_port))
        except OSError as error:
            self.sock.close()
            raise VmctlError(f"port forward {host_port}:{guest_port}/{protocol}: cannot listen on "
                             f"{BIND_ADDRESS}:{host_port}: {error.strerror}") from None
        if protocol == "tcp":
            self.sock.listen(16)
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
