"""`ready:` probes with tiny guests (they print VMCTL-READY, nothing else): a log line, an HTTP
answer from a server on this host, and probes that never become true (timeout, hint)."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from vmctl.errors import VmctlError
from vmctl.state import StateStore
from vmctl.testing import guest


@pytest.fixture
def http_port():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(204 if self.path == "/ok" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_log_and_http_probes_pass(assemble, tmp_path, http_port):
    spec = {"kernel": str(assemble("ready.S")), "memory": "32M",
            "ready": [{"log": r"^VMCTL-READY$", "timeout": 10}, {"http": f"http://127.0.0.1:{http_port}/ok", "status": 204}]}
    with guest(spec, store=StateStore(tmp_path / "state")) as vm:
        assert vm.ready_seconds < 60


@pytest.mark.parametrize("probe, seen", [
    ({"log": "never printed", "timeout": 1, "hint": "did the app start?"}, "no such line in the console log"),
    ({"http": "http://127.0.0.1:{port}/broken", "timeout": 1, "hint": "did the app start?"}, "answered 503"),
])
def test_a_probe_that_never_passes_names_its_line_and_hint(assemble, tmp_path, http_port, probe, seen):
    probe = {k: v.replace("{port}", str(http_port)) if isinstance(v, str) else v for k, v in probe.items()}
    spec_file = tmp_path / "vm.yaml"
    spec_file.write_text(f"machines:\n  p:\n    kernel: {assemble('ready.S')}\n    memory: 32M\n"
                         f"    ready:\n      - {probe!r}\n".replace("'", '"'))
    store = StateStore(tmp_path / "state")
    started = time.monotonic()
    with pytest.raises(VmctlError) as error:
        with guest(spec_file, store=store):
            pass
    message = str(error.value)
    assert message.startswith(f"{spec_file}:6: p-") and seen in message and message.endswith("hint: did the app start?")
    assert "\n" not in message and time.monotonic() - started < 60
    assert store.names() == []  # the guest went away with the failure


def test_fixture_ready_argument(assemble, tmp_path):
    with pytest.raises(VmctlError, match="ready.log 'nope' not true after 0.5 s"):
        with guest({"kernel": str(assemble("ready.S")), "memory": "32M"}, store=StateStore(tmp_path / "state"),
                   ready=[{"log": "nope", "timeout": 0.5}]):
            pass
