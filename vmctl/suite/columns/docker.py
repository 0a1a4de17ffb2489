"""docker: a real Docker Engine (Debian's docker.io), the reference people read VMs against.

When no daemon answers at DOCKER_HOST (or /var/run/docker.sock), the column starts its own
dockerd: data root, exec root, socket and pid file under the run's work directory, a bridge
of its own (so it never takes docker0 from another daemon) and --iptables=false (the host
reaches containers on the bridge directly; nothing is left in the host's iptables). close()
stops that dockerd and deletes its bridge and files. The image is the same tree, loaded with
`docker import` (no registry).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from ...backends.container.overlay_root import base_tree
from ...errors import VmctlError
from .base import ColumnUnavailable, InstanceSpec, Output

DAEMON_TIMEOUT = 60.0


def _free_bridge_subnet() -> ipaddress.IPv4Network:
    """A /24 in 172.30.0.0/16 no route on the host uses yet."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    used = {line.split()[0] for line in routes.splitlines() if line and line[0].isdigit()}
    for third in range(10 + os.getpid() % 200, 256):
        net = ipaddress.IPv4Network(f"172.30.{third}.0/24")
        if not any(ipaddress.ip_network(u, strict=False).overlaps(net) for u in used if "/" in u):
            return net
    raise VmctlError("docker: no free /24 in 172.30.0.0/16 for the suite's bridge")


class Dockerd:
    """The suite's own dockerd, or None-like when one already runs."""

    def __init__(self, work: Path) -> None:
        self.work = work / "docker"
        self.socket = self.work / "docker.sock"
        self.bridge = f"vmctldk{os.getpid() % 100000}"
        self.process: subprocess.Popen | None = None

    def start(self) -> str:
        self.work.mkdir(parents=True, exist_ok=True)
        subnet = _free_bridge_subnet()
        gateway = f"{next(subnet.hosts())}/{subnet.prefixlen}"
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", gateway, "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        log = open(self.work / "dockerd.log", "ab")
        try:
            self.process = subprocess.Popen(
                ["dockerd", "--data-root", str(self.work / "root"), "--exec-root", str(self.work / "exec"),
                 "-H", f"unix://{self.socket}", "--pidfile", str(self.work / "dockerd.pid"),
                 "--bridge", self.bridge, "--iptables=false", "--ip-masq=false"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        finally:
            log.close()
        host = f"unix://{self.socket}"
        deadline = time.monotonic() + DAEMON_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = (self.work / "dockerd.log").read_text(errors="replace").strip().splitlines()[-1:]
                self.stop()
                raise ColumnUnavailable(f"docker: dockerd exited: {tail[0][:200] if tail else 'no log'}")
            if subprocess.run(["docker", "-H", host, "version"], capture_output=True).returncode == 0:
                return host
            time.sleep(0.2)
        self.stop()
        raise ColumnUnavailable(f"docker: dockerd did not answer within {DAEMON_TIMEOUT:g} s")

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
            self.process = None
        # containerd (its child) exits with it; mounts under the data root go with the daemon
        if os.path.exists(f"/sys/class/net/{self.bridge}"):
            _ip("link", "del", self.bridge)
        _unmount_under(self.work)
        shutil.rmtree(self.work, ignore_errors=True)


def _unmount_under(folder: Path) -> None:
    """Anything dockerd left mounted below `folder` (overlay2 merged dirs, netns files)."""
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for target in sorted((m for m in mounts if m.startswith(str(folder))), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise VmctlError(f"docker: ip {' '.join(args)}: {done.stderr.strip()}")


class DockerInstance:
    def __init__(self, column: "DockerColumn", name: str) -> None:
        self.column = column
        self.name = name
        self.address: str | None = None
        self.removed = False

    def run(self, script: str, timeout: float = 600.0) -> Output:
        try:
            done = subprocess.run(self.column.docker("exec", self.name, "/bin/sh", "-c", script),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise VmctlError(f"{self.name}: command timed out after {timeout:g} s") from None
        return Output(done.returncode, done.stdout, done.stderr)

    def _inspect(self) -> dict:
        done = subprocess.run(self.column.docker("inspect", self.name), capture_output=True, text=True)
        return json.loads(done.stdout)[0] if done.returncode == 0 else {}

    def host_pids(self) -> list[int]:
        """The container's processes (its PID namespace) and its containerd shim."""
        init = self._inspect().get("State", {}).get("Pid") or 0
        if not init:
            return []
        namespace = os.readlink(f"/proc/{init}/ns/pid")
        pids = [int(e) for e in os.listdir("/proc") if e.isdigit() and _readlink(f"/proc/{e}/ns/pid") == namespace]
        shim = _parent(init)
        return sorted(pids + ([shim] if shim else []))

    def disk_bytes(self) -> int:
        from ...proc import allocated_bytes

        upper = self._inspect().get("GraphDriver", {}).get("Data", {}).get("UpperDir")
        return allocated_bytes(Path(upper)) if upper else 0

    def remove(self) -> None:
        if not self.removed:
            subprocess.run(self.column.docker("rm", "--force", self.name), capture_output=True)
            self.removed = True


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


class DockerColumn:
    name = "docker"

    def __init__(self, image: str, work: Path) -> None:
        if shutil.which("docker") is None or shutil.which("dockerd") is None:
            raise ColumnUnavailable("docker: Docker Engine is not installed (apt-get install docker.io)")
        self.tree = base_tree(image)
        self.image = f"vmctl-suite/{image}:{os.getpid()}"
        self.daemon: Dockerd | None = None
        self.host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        if subprocess.run(["docker", "-H", self.host, "version"], capture_output=True).returncode != 0:
            self.daemon = Dockerd(work)
            self.host = self.daemon.start()
        try:
            version = subprocess.run(self.docker("version", "--format", "{{.Server.Version}}"),
                                     capture_output=True, text=True).stdout.strip()
            self.label = f"docker ({version}, {'own dockerd' if self.daemon else 'running dockerd'})"
            self._import()
        except BaseException:
            self.close()
            raise

    def docker(self, *args: str) -> list[str]:
        return ["docker", "-H", self.host, *args]

    def _import(self) -> None:
        """The same tree as a one-layer image (docker import reads a tar on stdin)."""
        tar = subprocess.Popen(["tar", "-C", str(self.tree), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        done = subprocess.run(self.docker("import", "-", self.image), stdin=tar.stdout, capture_output=True, text=True)
        tar.stdout.close()
        tar.wait()
        if done.returncode or tar.returncode:
            raise VmctlError(f"docker: import of {self.tree} failed: {done.stderr.strip()[-200:]}")

    def start(self, spec: InstanceSpec, index: int) -> DockerInstance:
        instance = DockerInstance(self, f"vmctl-suite-{os.getpid()}-{index}")
        done = subprocess.run(self.docker(
            "run", "--detach", "--name", instance.name, f"--cpus={spec.cpus}", f"--memory={spec.memory_mib}m",
            *([] if spec.network else ["--network", "none"]), self.image, "/bin/sleep", "infinity"),
            capture_output=True, text=True)
        if done.returncode:
            instance.remove()
            raise VmctlError(f"docker: run failed: {done.stderr.strip()[-200:]}")
        if spec.network:
            instance.address = instance._inspect()["NetworkSettings"]["IPAddress"] or None
        return instance

    def backing_files(self, relative: str) -> list[Path]:
        """`docker import` copied the tree into the image's one layer: those are the files."""
        done = subprocess.run(self.docker("image", "inspect", self.image), capture_output=True, text=True)
        layer = json.loads(done.stdout)[0].get("GraphDriver", {}).get("Data", {}).get("UpperDir") if done.returncode == 0 else None
        return sorted((Path(layer) / relative).glob("*")) if layer else []

    def close(self) -> None:
        subprocess.run(self.docker("rmi", "--force", self.image), capture_output=True)
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None
