"""The `vmctl.cmd` script on the kernel command line: long scripts travel gzipped, and the stub
that unpacks them runs the script in the same shell, with its stdin and exit status."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from vmctl.guest_contract import GUEST_AGENT, boot_script, decode, encode, encode_script


def test_a_short_script_stays_plain() -> None:
    assert encode_script("uname -a") == encode("uname -a")


def test_a_long_set_up_script_is_packed_well_below_plain_base64() -> None:
    script = boot_script(["python3", "-V"], {"PYTHONDONTWRITEBYTECODE": "1"}, "dev")
    assert GUEST_AGENT in script
    assert len(encode_script(script)) < 0.85 * len(encode(script))


@pytest.mark.skipif(not shutil.which("busybox") and not shutil.which("/bin/busybox"),
                    reason="busybox-static is not installed")
def test_the_packed_stub_runs_the_script_in_the_same_shell_with_its_stdin_and_status() -> None:
    script = "\n".join([f"export V{i}=value-{i}" for i in range(120)] + ["read -r line", 'echo "$V119 $line"', "exit 7"])
    word = encode_script(script)
    assert word != encode(script)
    run = subprocess.run(["/bin/busybox", "sh", "-c", decode(word)], input=b"from-stdin\n", capture_output=True)
    assert run.stdout == b"value-119 from-stdin\n" and run.returncode == 7, run
