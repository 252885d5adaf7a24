"""What the command-line tools share: one `error:` line (exit code 2) instead of a traceback."""

from __future__ import annotations

import os
import sys
from typing import Callable


def report_errors(run: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Run a CLI body; bad input (ValueError, FileNotFoundError) prints `error: ...` and returns 2.
    FLAXDIFF_DEBUG=1 re-raises, for the traceback."""
    try:
        return run() or 0
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get("FLAXDIFF_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
