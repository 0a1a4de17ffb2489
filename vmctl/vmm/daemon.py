"""A detached VMM process for one machine: `python -m vmctl.vmm.daemon <machine folder>`.

It reads machine.json, runs the machine with its console in console.log, answers the control
socket, and writes outcome.json when the guest ends (however it ends).
"""

from __future__ import annotations

import base64
import json
import os
import logging
import signal
import sys
import time
from pathlib import Path

from ..errors import VmctlError
from ..state import CONSOLE, CONTROL, OUTCOME, RECORD, VMM_LOG, MachineRecord
from .control import ControlServer
from .machine import Machine, MachineConfig
from .outcome import Outcome

log = logging.getLogger("vmctl.vmm")


def config_from_record(record: MachineRecord, console: Path) -> MachineConfig:
    from ..backends.kvm import machine_config

    return machine_config(record, console)


def serve(folder: Path) -> int:
    record = MachineRecord(**json.loads((folder / RECORD).read_text()))
    started = time.time()
    outcome: Outcome
    console_file = open(folder / CONSOLE, "ab", buffering=0)
    try:
        machine = Machine(config_from_record(record, console_file))
    except VmctlError as error:
        outcome = Outcome(1, str(error))
        _write_outcome(folder, outcome, started)
        return 1

    def status(_: dict) -> dict:
        return {"state": "running", "pid": os.getpid(), "uptime": time.time() - started, "exits": machine.exits}

    def stop(message: dict) -> dict:
        machine.stop(Outcome(0, str(message.get("reason", "stopped by vmctl"))))
        return {"stopping": True}

    def run_in_guest(message: dict) -> dict:
        if machine.agent is None:
            raise VmctlError("this machine has no guest agent channel")
        result = machine.agent.exec(str(message["script"]), float(message.get("timeout_seconds", 60)))
        return {"exit_code": result.exit_code, "stdout": base64.b64encode(result.stdout).decode(),
                "stderr": base64.b64encode(result.stderr).decode()}

    server = ControlServer(folder / CONTROL, {"status": status, "stop": stop, "exec": run_in_guest})
    server.start()
    # SIGTERM from `vmctl down`'s fallback ends the guest like a stop request.
    signal.signal(signal.SIGTERM, lambda *_: machine.stop(Outcome(143, "terminated (SIGTERM)")))
    try:
        outcome = machine.run()
    except VmctlError as error:
        outcome = Outcome(1, str(error))
    finally:
        server.close()
        console_file.close()
    _write_outcome(folder, outcome, started)
    return outcome.exit_code


def _write_outcome(folder: Path, outcome: Outcome, started: float) -> None:
    data = {"exit_code": outcome.exit_code, "reason": outcome.reason, "crashed": outcome.crashed,
            "started": started, "ended": time.time()}
    temporary = folder / f".{OUTCOME}.tmp"
    temporary.write_text(json.dumps(data))
    temporary.replace(folder / OUTCOME)


def main() -> int:
    folder = Path(sys.argv[1])
    logging.basicConfig(filename=folder / VMM_LOG, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve(folder)
    except Exception:
        log.exception("VMM failed")
        _write_outcome(folder, Outcome(1, "VMM failed: see vmm.log"), time.time())
        return 1


if __name__ == "__main__":
    sys.exit(main())
