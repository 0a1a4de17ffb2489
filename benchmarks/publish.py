"""The last step of every benchmark: its result as JSON (for docs, plots and later runs to
compare against) and its table on stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def publish(result: dict[str, Any], output: Path, table: str) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    print(f"wrote {output}", file=sys.stderr, flush=True)
