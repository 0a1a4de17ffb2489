"""The CLI imports only the module of the command it runs (start-up time of a VMM)."""

import subprocess
import sys

from vmctl.cli import COMMAND_MODULE, COMMAND_MODULES, build_parser


def test_every_registered_command_is_mapped_to_its_module():
    parser = build_parser()
    registered = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 (argparse internals)
    assert registered == set(COMMAND_MODULE)
    assert set(COMMAND_MODULE.values()) == set(COMMAND_MODULES)


def test_boot_does_not_import_the_spec_the_disk_or_the_network_code():
    probe = ("import sys; from vmctl.cli import build_parser; build_parser(['boot', '--kernel', 'k']);"
             "print(sorted(m for m in sys.modules if m.startswith(('vmctl.spec', 'vmctl.disk', 'vmctl.net',"
             " 'vmctl.cli.lifecycle', 'yaml'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_unknown_command_lists_every_command(capsys):
    try:
        build_parser(["frob"]).parse_args(["frob"])
    except SystemExit:
        pass
    err = capsys.readouterr().err
    assert "invalid choice: 'frob'" in err and "boot" in err and "run" in err
