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
def handling_stop_signals(handler: Callable[[int, object], None]) -> Iterator[dict[int, object]]:
    """``handler`` for SIGTERM and SIGUSR1 within the block; yields the handlers it replaced (signal -> handler),
    which come back on exit (an entry removed from the dict is not restored). Outside the main thread, where Python
    cannot install handlers, nothing changes and the dict is empty."""
    previous: dict[int, object] = {}
    try:
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread (a notebook's worker thread, a test runner's)
        pass
    try:
        yield previous
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def stop_requests() -> Iterator[Callable[[], int]]:
    """Within the block, SIGTERM and SIGUSR1 are recorded; yields a function returning the first one received
    (its number, 0 for none). The same signal a second time gets the previous handlers back and is raised again,
    so it acts as it would outside the block (under ``sparsert``, SIGTERM unwinds and exits 143): a way out when
    the step in progress is stuck. The previous handlers come back on exit. Outside the main thread, where Python
    cannot install handlers, signals keep their handlers and the function always returns 0."""
    received: list[int] = []

    def note(signum: int, frame: object) -> None:
        if signum in received:  # the same signal twice (not SIGTERM after Slurm's SIGUSR1 warning: that is noted)
            for sig, old in previous.items():
                signal.signal(sig, old)
            previous.clear()
            signal.raise_signal(signum)
            return
        received.append(signum)

    with handling_stop_signals(note) as previous:
        yield lambda: received[0] if received else 0


def signal_name(signum: int) -> str:
    """``15`` -> ``"SIGTERM"``."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
