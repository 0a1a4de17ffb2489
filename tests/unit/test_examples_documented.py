"""Every example documents the commands the linux tier runs (tests/examples_doc.py)."""

from __future__ import annotations

import pytest
from examples_doc import CONTAINER_EXAMPLES, all_examples, documented_commands

from vmctl.spec import load_spec


@pytest.mark.parametrize("path", all_examples(), ids=lambda p: p.name)
def test_each_example_documents_commands_that_use_it_and_clean_up(path):
    commands = documented_commands(path)
    assert commands, f"{path.name} documents no `vmctl …` command to run"
    assert any(f"examples/{path.name}" in command for command in commands)
    spec = load_spec(path)  # the example itself parses
    if any(" up " in f" {command} " for command in commands):
        assert any("vmctl rm" in command for command in commands), f"{path.name}: `up` without `rm`"
    backends = {machine.backend for machine in spec.machines}
    if path.name in CONTAINER_EXAMPLES:
        assert "container" in backends


def test_trailing_notes_are_not_part_of_the_command(tmp_path):
    example = tmp_path / "x.yaml"
    example.write_text("# prose: vmctl image build\n#   vmctl up x.yaml   # a note\n#   curl -sf http://h/\n"
                       "#  vmctl exec a -- sh -c 'a # b'\nmachines: {a: {}}\n")
    assert documented_commands(example) == ["vmctl up x.yaml", "curl -sf http://h/", "vmctl exec a -- sh -c 'a # b'"]
