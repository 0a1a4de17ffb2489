"""A pytest test with a throwaway guest that has the project folder mounted and serves it on a
random host port (run: `python -m pytest examples/test_guest_example.py`, as root).

The `vmctl_guest` fixture comes with vmctl (a pytest plugin). The guest is removed after the
test, and also when pytest itself is killed: a watchdog holding a pidfd of this process
removes it, its TAP and its overlay.
"""

import urllib.request
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def test_guest_serves_the_project_folder(vmctl_guest):
    vm = vmctl_guest(
        {
            "memory": "128M",
            "mounts": [{"host": str(PROJECT), "guest": "/src", "read_only": True}],
            "network": {"mode": "isolated", "forwards": ["0:8080"]},  # 0: any free host port
            "provision": ["busybox httpd -p 8080 -h /src"],
        },
        ready=[{"tcp": 8080, "timeout": 60, "hint": "busybox httpd did not start"}],
    )
    assert vm.exec("head -1 /src/README.md")[1] == "# vmctl\n"
    with urllib.request.urlopen(f"http://127.0.0.1:{vm.host_port(8080)}/README.md", timeout=30) as answer:
        assert answer.read().startswith(b"# vmctl")
    vm.put(b"made on the host\n", "/root/note")                 # vmctl cp under the hood
    assert vm.get("/root/note") == b"made on the host\n"
