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
    except RuntimeError as error:  # JAX's runtime errors; only the multi-process connect failure is explained
        if GLOO_CONNECT_FAILED not in str(error) or os.environ.get("FLAXDIFF_DEBUG"):
            raise
        print(f"error: the processes of a multi-process job could not connect to each other for their first "
              f"collective ({str(error).splitlines()[0]}). Every process must be running, started with the same "
              "flags, and able to reach the others over TCP; a process more than 30 s behind the others when "
              "they connect fails the same way (a host starved of CPU). Start all processes again; "
              "--resume_from_checkpoint latest continues from the last checkpoint.", file=sys.stderr)
        return 1


GLOO_CONNECT_FAILED = "Gloo context initialization failed"  # XLA:CPU's message when gloo's setup fails
