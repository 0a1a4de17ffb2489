"""Every fuzz target (tests/fuzz/targets.py) for a few seconds, plus regression tests for
what fuzzing found. Long runs: scripts/fuzz TARGET SECONDS."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "fuzz"))

from run import fuzz  # noqa: E402
from targets import TARGETS, cleanup  # noqa: E402

from vmctl.spec import parse_spec  # noqa: E402
from vmctl.spec.parse import SpecError  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _devices_closed_after():
    yield
    cleanup()


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz_target_briefly(name):
    if name == "net" and os.geteuid() != 0:
        pytest.skip("the net target needs root for its TAP device")
    result = fuzz(name, 3.0, seed=1)
    assert result["execs"] > 0
    assert result["crashes"] == 0, result


@pytest.mark.parametrize("text", ["name: x\ncpus: !!int x", "name: x\ncpus: !!float 1e999x",
                                  "name: x\nmemory: !!binary '%%'",
                                  "name: x\x17\ncpus: 1"])  # a control character
def test_spec_scalar_with_a_tag_that_cannot_be_read_is_a_spec_error(text):
    """Found by the spec fuzz target: a ValueError/ParserError traceback, not one line."""
    with pytest.raises(SpecError, match="fuzz.yaml"):
        parse_spec(text, source="fuzz.yaml")
