"""vhost-net's ioctl numbers and struct layouts against <linux/vhost.h>, via a compiled C
program; and what the net device does where /dev/vhost-net cannot be used."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmctl.virtio import vhost

HEADER = Path("/usr/include/linux/vhost.h")
IOCTLS = [name for name, value in vars(vhost).items() if name.startswith("VHOST_") and isinstance(value, int)]
# Our struct.Struct formats and the C structs they stand for.
STRUCTS = {
    "_VRING_STATE": "struct vhost_vring_state",
    "_VRING_FILE": "struct vhost_vring_file",
    "_VRING_ADDR": "struct vhost_vring_addr",
    "_MEMORY_HEADER": "struct vhost_memory",
    "_MEMORY_REGION": "struct vhost_memory_region",
}


@pytest.fixture(scope="module")
def c_values(tmp_path_factory) -> dict[str, int]:
    if not shutil.which("gcc") or not HEADER.exists():
        pytest.skip("gcc and linux-libc-dev (/usr/include/linux/vhost.h) are needed to compare the ABI")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/vhost.h>", "int main(void) {"]
    lines += [f'printf("{name} %lu\\n", (unsigned long){name});' for name in IOCTLS]
    lines += [f'printf("{name} %zu\\n", sizeof({c_name}));' for name, c_name in STRUCTS.items()]
    lines += ['printf("addr_used %zu\\n", offsetof(struct vhost_vring_addr, used_user_addr));',
              'printf("addr_avail %zu\\n", offsetof(struct vhost_vring_addr, avail_user_addr));',
              'printf("region_user %zu\\n", offsetof(struct vhost_memory_region, userspace_addr));',
              "return 0; }"]
    folder = tmp_path_factory.mktemp("vhost-abi")
    (folder / "abi.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(folder / "abi"), str(folder / "abi.c")], check=True)
    output = subprocess.run([str(folder / "abi")], check=True, capture_output=True, text=True).stdout
    return {name: int(value) for name, value in (line.split() for line in output.splitlines())}


@pytest.mark.parametrize("name", sorted(IOCTLS))
def test_ioctl_number_matches_the_kernel(c_values, name):
    assert getattr(vhost, name) == c_values[name], f"{name}: 0x{getattr(vhost, name):x} vs 0x{c_values[name]:x}"


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_size_matches_the_kernel(c_values, name):
    assert getattr(vhost, name).size == c_values[name]


def test_field_offsets_match_the_kernel(c_values):
    # <IIQQQQ: index, flags, desc, used, avail, log; <QQQQ: guest, size, userspace, flags
    assert (c_values["addr_used"], c_values["addr_avail"], c_values["region_user"]) == (16, 24, 16)
