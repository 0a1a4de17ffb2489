"""iperf3 -J: TCP throughput between the host (client) and an instance (server)."""

from __future__ import annotations

import json

from . import ToolOutputError, excerpt

PORT = 5201
PID_FILE = "/var/tmp/iperf3.pid"


def server_command() -> str:
    return f"iperf3 --server --daemon --port {PORT} --pidfile {PID_FILE}"


def stop_command() -> str:
    # by its pid file: a native instance shares the host's PID namespace
    return f"[ -f {PID_FILE} ] && kill $(cat {PID_FILE}); rm -f {PID_FILE}; true"


def client_command(address: str, seconds: int, reverse: bool) -> str:
    """-R: the server (the instance) sends, the client receives."""
    return f"iperf3 --client {address} --port {PORT} --time {seconds} --json{' --reverse' if reverse else ''}"


def parse(text: str) -> float:
    """Mbit/s received."""
    try:
        data = json.loads(text)
    except ValueError:
        raise ToolOutputError(f"iperf3: output is not JSON: {excerpt(text)}") from None
    if "error" in data:
        raise ToolOutputError(f"iperf3: {data['error']}")
    try:
        return data["end"]["sum_received"]["bits_per_second"] / 1e6
    except (KeyError, TypeError):
        raise ToolOutputError("iperf3: no end.sum_received.bits_per_second in its JSON") from None
