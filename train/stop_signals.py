"""Stop requests by signal for long jobs: SIGTERM and SIGUSR1 are noted instead of ending the process at once.

Batch schedulers end a job with SIGTERM and, after a grace period (Slurm's ``KillWait``, 30 s by default; torchrun
forwards it to its workers and waits as long), SIGKILL; Slurm's ``--signal`` sends SIGUSR1 ahead of a time limit by
default. Python's default SIGTERM ends the process where it stands, losing every step since the last checkpoint.
Inside :func:`stop_requests` the first such signal is only recorded; the training loop asks after each step, saves a
checkpoint of that step and stops (:class:`~sparsert.runtime.errors.StoppedBySignal`).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator

STOP_SIGNALS = ("SIGTERM", "SIGUSR1")  # SIGUSR1 does not exist on Windows: left out there


@contextlib.contextmanager
def stop_requests() -> Iterator[Callable[[], int]]:
    """Within the block, SIGTERM and SIGUSR1 are recorded; yields a function returning the first one received
    (its number, 0 for none). The same signal a second time gets the previous handlers back and is raised again,
    so it acts as it would outside the block (under ``sparsert``, SIGTERM unwinds and exits 143): a way out when
    the step in progress is stuck. The previous handlers come back on exit. Outside the main thread, where Python
    cannot install handlers, signals keep their handlers and the function always returns 0."""
    received: list[int] = []
    previous: dict[int, object] = {}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        previous.clear()

    def note(signum: int, frame: object) -> None:
        if signum in received:  # the same signal twice (not SIGTERM after Slurm's SIGUSR1 warning: that is noted)
            restore()
            signal.raise_signal(signum)
            return
        received.append(signum)

    try:
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                previous[sig] = signal.signal(sig, note)
    except ValueError:  # not the main thread (a notebook's worker thread, a test runner's)
        pass
    try:
        yield lambda: received[0] if received else 0
    finally:
        restore()


def signal_name(signum: int) -> str:
    """``15`` -> ``"SIGTERM"``."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
