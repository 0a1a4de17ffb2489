"""Which host directories the nested host writes through to (no QEMU needed)."""

from pathlib import Path

from vmctl.nested.l1_host import _with_hidden_cwd


def test_a_checkout_under_tmp_is_shared_because_l1_hides_tmp():
    assert _with_hidden_cwd([], Path("/tmp/ci")) == [Path("/tmp/ci")]
    assert _with_hidden_cwd([], Path("/run/user/0/x")) == [Path("/run/user/0/x")]


def test_visible_or_already_shared_directories_are_left_alone():
    assert _with_hidden_cwd([], Path("/work/main")) == []
    assert _with_hidden_cwd([Path("/tmp")], Path("/tmp/ci")) == [Path("/tmp")]
