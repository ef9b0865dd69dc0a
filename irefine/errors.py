"""How a command fails: the exit codes every ``irefine`` command shares, and the user-mistake error.

Exit codes: 0 done, 1 job failed, 2 bad input (nothing written), 130 interrupted (resumable).
``main`` maps :class:`BadInput` and the engine's :class:`~engine.core.SpecError` to 2, in one place.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class BadInput(Exception):
    """A user mistake: printed as one line, exit code 2."""
