"""What every ActionFleet command shares: its exit codes, messages on stderr, JSON results
on stdout (one definition for the agent's, the operator's and the audit commands)."""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_INVALID", "EXIT_OK", "eprint", "print_json"]

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))
