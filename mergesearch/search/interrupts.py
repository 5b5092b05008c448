"""Ctrl-C stops a search within the trial it interrupts, and is never lost.

Python raises KeyboardInterrupt wherever the main thread happens to be. Inside a storage commit
that can leave the transaction open (SQLite then refuses the trial's FAIL as "database is
locked"); inside Optuna's own bookkeeping between trials it breaks Optuna's `_run_trial`
("Should not reach"); inside a garbage-collection callback (SQLAlchemy has some) Python prints
and drops it, and the search runs on. So during `deferred()`:
- SIGINT is raised at once only inside the objective (`objective()`: merging, scoring) and
  outside storage calls (`guard`); Optuna then fails the trial and re-raises it;
- inside a storage call of the objective it is raised when the call returns;
- anywhere else it waits for `check` (an Optuna callback after each trial) or for the next
  trial's objective, whichever comes first — as does one Python dropped.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import optuna

_depth = 0  # storage calls in progress on the main thread
_in_objective = False  # the main thread is inside the objective
_interrupted = False  # a SIGINT arrived during `deferred()`


def guard(storage: optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    """The storage, each public method of Optuna's storage interface wrapped so that an interrupt
    waits for it (on the main thread, where Python runs signal handlers; other threads, such as
    the heartbeat's, call through unchanged)."""
    for name in dir(optuna.storages.BaseStorage):
        fn = getattr(storage, name, None)
        if not name.startswith("_") and callable(fn):
            setattr(storage, name, _deferring(fn))
    return storage


def _deferring(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        global _depth
        if threading.current_thread() is not threading.main_thread():
            return fn(*args, **kwargs)
        _depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _depth -= 1
            if not _depth and _in_objective and _interrupted:
                raise KeyboardInterrupt

    return call


def _on_sigint(signum, frame) -> None:
    global _interrupted
    _interrupted = True
    if _in_objective and not _depth:
        raise KeyboardInterrupt


def _unraisable(previous):
    def hook(info) -> None:  # a KeyboardInterrupt Python drops is raised again later
        if not (isinstance(info.exc_value, KeyboardInterrupt) and _interrupted):
            previous(info)

    return hook


@contextmanager
def objective() -> Iterator[None]:
    """Around the objective's body: where an interrupt may be raised at once."""
    global _in_objective
    check()
    _in_objective = True
    try:
        yield
    finally:
        _in_objective = False


def check(*_) -> None:
    """Raise a pending interrupt (also an Optuna callback: after a trial is recorded)."""
    if _interrupted:
        raise KeyboardInterrupt


@contextmanager
def deferred() -> Iterator[None]:
    """SIGINT handled as the module says, for the block's duration: on the main thread, where
    Python's own handler is in place (one started with SIGINT ignored, as `nohup cmd &` does,
    keeps ignoring it; an embedding program's handler is left alone)."""
    global _interrupted
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    _interrupted = False
    previous, hook = signal.signal(signal.SIGINT, _on_sigint), sys.unraisablehook
    sys.unraisablehook = _unraisable(hook)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = hook
        _interrupted = False
