"""A guard for tests of things that used to hang: the test fails instead of waiting forever."""

from __future__ import annotations

import contextlib
import signal


class TimeLimit(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise TimeLimit in the main thread after ``seconds``; a signal also ends a blocking
    open() or a pure-Python loop."""
    def alarm(signum, frame):
        raise TimeLimit(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
