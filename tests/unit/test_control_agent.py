"""The guest side of the exec channel (GUEST_AGENT) and the guest script /init runs, under the
host's busybox sh: the agent on a pseudo-terminal stands in for the guest's ttyS1."""

from __future__ import annotations

import base64
import os
import pty
import select
import shutil
import signal
import subprocess
import threading

import pytest

from vmctl.guest_contract import GUEST_AGENT
from vmctl.guest_contract import boot_script as guest_script
from vmctl.vmm.agent import UART, AgentChannel

BUSYBOX = shutil.which("busybox")
pytestmark = pytest.mark.skipif(BUSYBOX is None, reason="busybox (Debian: busybox-static) runs the guest scripts")


def _guest_sh(script: str, tmp_path) -> list[str]:
    # The scripts call /bin/busybox by absolute path, as in the guest; point that at the host's.
    return [BUSYBOX, "sh", "-c", script.replace("/bin/busybox", BUSYBOX).replace("/tmp/", f"{tmp_path}/")]


@pytest.fixture
def agent(tmp_path):
    master, slave = pty.openpty()
    script = GUEST_AGENT.replace("/dev/ttyS1", os.ttyname(slave)) + "\nwait"
    process = subprocess.Popen(_guest_sh(script, tmp_path), stdin=subprocess.DEVNULL, start_new_session=True)
    channel = AgentChannel()
    receive = channel.link(UART, lambda data: os.write(master, data))

    def pump() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            receive(data)

    threading.Thread(target=pump, daemon=True).start()
    yield channel
    os.killpg(process.pid, signal.SIGKILL)  # the agent is a background subshell of the script
    process.wait()
    os.close(master)
    os.close(slave)


def test_agent_runs_scripts_and_returns_status_and_both_outputs(agent):
    result = agent.exec("echo out; echo err >&2; exit 5", timeout=30)
    assert (result.exit_code, result.stdout, result.stderr) == (5, b"out\n", b"err\n")
    binary = agent.exec("printf '\\000\\377\\n'; head -c 20000 /dev/zero | tr '\\0' x", timeout=30)
    assert binary.exit_code == 0 and binary.stdout == b"\x00\xff\n" + b"x" * 20000
    long_script = "true " + "x" * 30000 + "; echo done"  # far beyond a terminal's 4 KiB line
    assert agent.exec(long_script, timeout=30).stdout == b"done\n"


def test_agent_posts_without_waiting(agent, tmp_path):
    assert agent.exec("true", timeout=30).exit_code == 0  # announced and serving
    marker = tmp_path / "posted"
    assert agent.post(f"echo yes > {marker}")
    assert agent.exec(f"cat {marker}", timeout=30).stdout == b"yes\n"  # ran in order


def test_guest_script_sets_the_environment_and_returns_the_command_status(tmp_path):
    script = guest_script(["sh", "-c", 'echo "$GREETING"; exit 4'], {"GREETING": "hi there"}, "root")
    script = script.replace("/dev/ttyS1", str(tmp_path / "no-such-tty"))  # the agent quits quietly
    result = subprocess.run(_guest_sh(script, tmp_path), capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout, result.stderr) == (4, "hi there\n", "")


def test_post_needs_an_announced_agent():
    assert AgentChannel().post("true") is False


def test_exec_with_input_gives_the_script_its_stdin_through_the_real_agent(agent):
    """`vmctl exec -i` over the agent: the bytes (any, more than one chunk) become the stdin."""
    from vmctl.backends.base import STDIN_CHUNK, exec_with_input

    run = lambda text: agent.exec(text, timeout=30)  # noqa: E731
    data = bytes(range(256)) * (STDIN_CHUNK // 128 + 3)
    result = exec_with_input(run, "wc -c; exit 3", data)
    assert (result.exit_code, result.stdout.strip()) == (3, str(len(data)).encode())
    assert exec_with_input(run, "od -An -c | head -1", b"").stdout.strip() == b""  # empty input: EOF
    assert exec_with_input(run, "cat", None).stdout == b""  # no -i: /dev/null


@pytest.mark.parametrize("named", ["the pty", "a missing device"])
def test_agent_runs_on_the_port_the_command_line_names_else_on_ttys1(tmp_path, named):
    """`vmctl.agent=NAME` (the VMM's virtio-console port, hvcN) when /dev/NAME exists, else ttyS1."""
    ports = [pty.openpty() for _ in range(2)]  # [0] stands in for hvcN, [1] for ttyS1
    port_name = os.ttyname(ports[0][1]).removeprefix("/dev/") if named == "the pty" else "hvc9"
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"console=ttyS0 quiet vmctl.agent={port_name} vmctl.cmd=eA==\n")
    argv = _guest_sh(GUEST_AGENT.replace("/dev/ttyS1", os.ttyname(ports[1][1])) + "\nwait", tmp_path)
    argv[-1] = argv[-1].replace("/proc/cmdline", str(cmdline))  # after _guest_sh's /tmp/ rewrite
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        chosen, other = (ports[0], ports[1]) if named == "the pty" else (ports[1], ports[0])
        assert _read_line(chosen[0]) == b"A ready"
        os.write(chosen[0], b"X 1 " + base64.b64encode(b"echo on-port") + b"\n")
        assert _read_line(chosen[0]) == b"R 1 0 " + base64.b64encode(b"on-port\n") + b" "
        assert not select.select([other[0]], [], [], 0)[0]  # nothing on the other port
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        for master, slave in ports:
            os.close(master)
            os.close(slave)


def _read_line(fd: int) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        assert select.select([fd], [], [], 30)[0], f"no line, got {data!r}"
        data += os.read(fd, 4096)
    return data.rstrip(b"\r\n")
