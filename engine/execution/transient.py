"""Which errors are worth retrying: infrastructure that can heal, never a user's bug.

Transient: a :class:`~engine.core.TransientError` (a lost store or cache, a lost Dask cycle), a
lost Dask worker (``KilledWorker``), a closed comm or connection, a timed-out scheduler, futures
cancelled because the client lost its scheduler. Anything else (a problem that fails to import
or build, a bug) fails the same way again: retrying it only delays the error.
"""

from __future__ import annotations

import concurrent.futures

from engine.core import TransientError


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` comes from infrastructure that may heal, so that a retry can succeed."""
    if isinstance(exc, (TransientError, ConnectionError, TimeoutError, concurrent.futures.CancelledError)):
        return True
    try:  # distributed is imported only where Dask is used
        from distributed import KilledWorker
        from distributed.comm.core import CommClosedError
    except ImportError:
        return False
    return isinstance(exc, (KilledWorker, CommClosedError))
