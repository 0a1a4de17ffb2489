"""The launcher process: import the VMM once, then fork one child per command.

Safety rules, each checked or enforced here:
- Threads and fork: the server never starts a thread, and refuses to fork if the process
  has more than one (a module that started one at import); the child would otherwise
  inherit locks held by threads that do not exist in it.
- fd leaks: the listening socket and connections are CLOEXEC and the child closes every
  fd except its stdio (the client's, received over SCM_RIGHTS), its own connection included:
  only the launcher holds that, so the client sees EOF when the launcher dies.
- Dead launcher: clients fall back to running the command themselves (connect fails), a
  client whose launcher dies mid-command stops the command (client.wait), and a command
  whose client dies is interrupted (the child watches the client's pidfd, the pid from
  SO_PEERCRED).
- One launcher per socket (a lock file), an idle launcher exits (`idle` seconds with no
  command running), and SIGTERM stops it after the running commands.
"""

from __future__ import annotations

import fcntl
import gc
import importlib
import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import traceback

from .client import ENV, MAX_MESSAGE, trusted_directory

# What a launched command would otherwise import itself (the VMM and its devices, the CLI).
PRELOAD = (
    "vmctl.cli", "vmctl.cli.boot", "vmctl.cli.lifecycle", "vmctl.cli.cp_cmd", "vmctl.transfer", "vmctl.vmm.control", "vmctl.vmm.machine", "vmctl.vmm.daemon", "vmctl.virtio.slot",
    "vmctl.virtio.blk", "vmctl.virtio.net", "vmctl.virtio.rng", "vmctl.virtio.console", "vmctl.virtio.vhost",
    "vmctl.disk.raw", "vmctl.disk.qcow2.image", "vmctl.net.host",
    # a clone's VMM: the restore path, and the virtio-fs of its transfer share
    "vmctl.vmm.save_restore", "vmctl.virtio.fs", "vmctl.fs.server",
    # a boot's (vmctl.vmm.machine imports them only when it boots)
    "vmctl.boot.loader", "vmctl.arch.vcpu_setup", "vmctl.arch.mptable",
)
IDLE_SECONDS = 900.0


class LauncherError(Exception):
    pass


def thread_count() -> int:
    """OS threads of this process (not only the ones `threading` knows about)."""
    return len(os.listdir("/proc/self/task"))


def preload(modules: tuple[str, ...] = PRELOAD) -> list[str]:
    """Import what the commands need; returns the modules that could not be imported."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


class Launcher:
    def __init__(self, path: str, idle: float = IDLE_SECONDS) -> None:
        self.path = path
        self.idle = idle
        self.children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)
        self.running = True
        self.forks = 0

    def serve(self, modules: tuple[str, ...] = PRELOAD) -> int:
        folder = os.path.dirname(self.path)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if not trusted_directory(self.path):
            raise LauncherError(f"{folder}: not a private directory of this user (mode 0700 expected)")
        lock = open(self.path + ".lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            return 0  # another launcher serves this socket
        try:
            gc.disable()  # no collection between the imports leaves holes in their pages
            try:
                preload(modules)
            finally:
                gc.enable()
            gc.freeze()
            if thread_count() != 1:
                raise LauncherError(f"{thread_count()} threads after the imports: refusing to fork")
            # SIGTERM is ours before the socket accepts anyone: a client that connects and
            # at once sends SIGTERM (a test, a quick `stop`) must not hit the default action.
            # It must also wake the poll (which CPython otherwise resumes after the handler).
            wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            signal.signal(signal.SIGTERM, self._stop)
            signal.set_wakeup_fd(wake_write)
            try:
                listener = self._listen()
                try:
                    self._loop(listener, wake_read)
                finally:
                    listener.close()
                    for path in (self.path, self.path + ".pid"):
                        try:
                            os.unlink(path)
                        except FileNotFoundError:
                            pass
            finally:
                signal.set_wakeup_fd(-1)
                os.close(wake_read)
                os.close(wake_write)
        finally:
            lock.close()
        return 0

    def _listen(self) -> socket.socket:
        try:
            os.unlink(self.path)  # a dead launcher's socket
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        listener.bind(self.path)
        os.chmod(self.path, 0o600)
        listener.listen(32)
        with open(self.path + ".pid", "w") as pidfile:
            pidfile.write(f"{os.getpid()}\n")
        return listener

    def _loop(self, listener: socket.socket, wake_read: int) -> None:
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        poller.register(wake_read, select.POLLIN)
        self._serve_events(listener, poller, wake_read)

    def _serve_events(self, listener: socket.socket, poller: select.poll, wake_read: int) -> None:
        listening = True
        while self.running or self.children:
            timeout = None if self.children else self.idle * 1000
            try:
                events = poller.poll(timeout)
            except InterruptedError:
                continue
            if not events and not self.children:
                return  # idle
            for fd, _ in events:
                if fd == wake_read:
                    while True:
                        try:
                            if not os.read(wake_read, 64):
                                break
                        except BlockingIOError:
                            break
                elif fd == listener.fileno() and listening:
                    connection, _ = listener.accept()
                    self._handle(connection, poller)
                elif fd in self.children:
                    self._reap(fd, poller)
            if not self.running and listening:
                poller.unregister(listener)  # finish the running commands, take no new ones
                listening = False

    def _stop(self, _signum: int, _frame: object) -> None:
        self.running = False

    def _handle(self, connection: socket.socket, poller: select.poll) -> None:
        try:
            message, fds, _, _ = socket.recv_fds(connection, MAX_MESSAGE, 3)
            request = json.loads(message) if message else None
        except (OSError, ValueError):
            request, fds = None, []
        if request is None or len(fds) != 3 or not self.running:
            for fd in fds:
                os.close(fd)
            connection.close()  # the client runs the command itself
            return
        if thread_count() != 1:
            raise LauncherError("a thread appeared in the launcher: refusing to fork")
        client_pid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        # Everything the launcher holds goes to the collector's permanent generation: the
        # child's collections then never write to those objects' headers, so their pages stay
        # shared with the launcher instead of being copied on the child's first full
        # collection (Pss per launched VMM, and copy-on-write faults, dear under emulation).
        gc.freeze()
        pid = os.fork()
        if pid == 0:
            _child(fds, request, client_pid)  # never returns
        self.forks += 1
        for fd in fds:
            os.close(fd)
        try:
            connection.send(f"pid {pid}".encode())
        except OSError:
            pass  # the client went away: its child notices and stops
        pidfd = os.pidfd_open(pid)
        poller.register(pidfd, select.POLLIN)
        self.children[pidfd] = (pid, connection)

    def _reap(self, pidfd: int, poller: select.poll) -> None:
        pid, connection = self.children.pop(pidfd)
        poller.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if code < 0:
            code = 128 - code  # killed by a signal: the shell's convention
        try:
            connection.send(f"exit {code}".encode())
        except OSError:
            pass
        connection.close()


def _child(fds: list[int], request: dict, client_pid: int) -> None:
    """In the fork: become the client's command, run it, exit with its status."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)  # the launcher's pipe: closed below
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, 1 << 16)  # the listener, every connection (its own too), the received fds
        os.setsid()  # its own session and process group, like a process the client started
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[ENV] = "1"
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _rebind_stdio()
        if not request.get("detach"):
            client = os.pidfd_open(client_pid)  # ProcessLookupError: the client is gone already
            threading.Thread(target=_watch_client, args=(client,), daemon=True).start()
        sys.argv = ["vmctl", *request["argv"]]
        result = importlib.import_module(request["module"]).main()
        code = result if isinstance(result, int) else 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code & 0xFF)


def _rebind_stdio() -> None:
    """sys.std* over the client's fds, buffered as CPython would for them."""
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", closefd=False, buffering=1 if os.isatty(1) else -1)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    if unbuffered:
        sys.stdout.reconfigure(write_through=True)


def _watch_client(pidfd: int) -> None:
    """The client ended (killed, or gone): interrupt the command, as Ctrl-C would."""
    select.select([pidfd], [], [])
    os.kill(os.getpid(), signal.SIGINT)
