"""Small helpers for the processes taskserve starts."""

from __future__ import annotations

import ctypes
import signal
import sys


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``signum`` to this process when its parent dies.

    Called first thing in replica processes (SIGTERM: they drain) and as the
    ``preexec_fn`` of the processes ``taskserve up`` starts. A no-op elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signum))
    except OSError:
        pass
