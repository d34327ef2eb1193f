"""SIGINT, SIGTERM and SIGHUP: every command ends promptly and leaves nothing half-written.

One mechanism for all commands: a registry of cleanup actions (temporary files to remove, child
processes to stop, batch jobs to cancel, an accepted job id to report) and one handler that runs
them and then dies by the same signal, so the exit status is what a shell expects (128 + N, or
-N for a parent that waits on it).

Why the handler never raises KeyboardInterrupt: an exception raised in a signal handler surfaces
wherever the interpreter happens to be, and inside a weakref callback or a `__del__` (h5py has
many) Python prints it and carries on, so about half the interrupts of a writing run were lost.
Nor does it return to let `finally` blocks close things: closing an h5py file flushes it, which
can take long or fail. The actions run right in the handler instead, each quick and bounded, then
the signal's default disposition is restored and the signal sent again, which ends the process
without running `atexit` hooks or flushing half-written files (their temporary names are already
removed). A second signal during the cleanup kills at once.

The handlers are installed only by the command line (`estpipe.entry`, before anything heavy is
imported, and `estpipe.cli.app.main`, which restores the previous handlers when it returns), never
by `import estpipe`: notebook users keep their own SIGINT handling. A signal already ignored when
the process starts (`nohup`, a background job of a script) stays ignored. The registry is used
everywhere, so the same writers are safe under the command line and harmless elsewhere.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable

SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)
# Seconds a cleanup action may wait for a child process (a dask worker, sbatch) before going on.
ACTION_WAIT_SECONDS = 5.0

_actions: dict[int, tuple[str, Callable[[], None]]] = {}
_tokens = itertools.count(1)
_lock = threading.Lock()
_deferred = 0  # depth of `deferred()` blocks in progress
_pending: list[int] = []  # signals that arrived inside a deferred block
_stopping = False


def register(action: Callable[[], None], what: str = "") -> int:
    """Run `action()` if a handled signal arrives; returns a token for `unregister`. Actions run
    newest first, must be quick (bounded waits only) and must not touch h5py or other locks the
    interrupted code may hold; what they raise is ignored."""
    token = next(_tokens)
    with _lock:
        _actions[token] = (what, action)
    return token


def unregister(token: int | None) -> None:
    if token is not None:
        with _lock:
            _actions.pop(token, None)


def remove_file(path: str | os.PathLike) -> Callable[[], None]:
    """An action that removes `path` if it exists."""
    path = os.fspath(path)

    def action() -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    return action


@contextmanager
def deferred():
    """A critical section: a handled signal that arrives inside it is acted on at its end.

    For the few statements that create something and register its cleanup (a temporary file and
    its removal, a child process and the action that waits for it), so that no signal can fall
    between the two and leave the thing behind."""
    global _deferred
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1
        if _deferred == 0 and _pending:
            signum = _pending[0]
            _pending.clear()
            # sent again rather than handled here: the handler must run in the main thread
            os.kill(os.getpid(), signum)


def _handle(signum: int, frame) -> None:
    global _stopping
    if _deferred:
        _pending.append(signum)
        return
    if _stopping:
        _die(signum)
    _stopping = True
    # A second signal of any of the three now ends the process at once, whatever the actions do.
    for s in SIGNALS:
        if signal.getsignal(s) is _handle:
            signal.signal(s, signal.SIG_DFL)
    with _lock:
        actions = list(_actions.values())[::-1]
    for _, action in actions:
        try:
            action()
        except BaseException:  # noqa: BLE001 - one action failing must not stop the others
            pass
    _die(signum)


def _die(signum: int) -> None:
    """End the process by `signum` with its default disposition (no atexit hooks, no flushing)."""
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)
    # A signal sent to oneself and not blocked is delivered before kill() returns; should it be
    # ignored after all (SIGINT may be, in some embedders), exit with the shell's status for it.
    time.sleep(0.5)
    os._exit(128 + signum)


def install() -> dict[int, object] | None:
    """Install the handler for SIGINT, SIGTERM and SIGHUP (those not ignored); returns what was
    there before, for `restore`. Outside the main thread (where Python cannot set handlers) it
    does nothing and returns None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {}
    for s in SIGNALS:
        old = signal.getsignal(s)
        if old is signal.SIG_IGN:
            continue
        previous[s] = old
        signal.signal(s, _handle)
    return previous


def restore(previous: dict[int, object] | None) -> None:
    if previous is None:
        return
    for s, old in previous.items():
        signal.signal(s, old if old is not None else signal.SIG_DFL)


@contextmanager
def handled():
    """The handlers installed for the duration of the block, the previous ones restored after."""
    previous = install()
    try:
        yield
    finally:
        restore(previous)


def say(message: str) -> None:
    """One line on stderr from inside the handler: os.write, since the interrupted code may be
    in the middle of printing (the buffered stream would refuse a reentrant write)."""
    try:
        os.write(sys.stderr.fileno(), f"estpipe: {message}\n".encode())
    except (OSError, ValueError, AttributeError):
        pass


# -- actions used by more than one back end --------------------------------------------------
def kill_child_processes() -> None:
    """Kill every descendant process of this one (dask nannies' workers, the multiprocessing
    resource tracker): stopped first, all of them, so that none sees another die before it is
    killed itself, then SIGKILL. Not waited for: reaping them here would take their exit status
    from the dask nanny still running in another thread, which logs it; killed processes cannot
    outlive the signal, and this process dies right after. A second look catches a worker the
    nanny was starting meanwhile."""
    import psutil

    me = psutil.Process()
    for _ in range(2):
        try:
            children = me.children(recursive=True)
        except psutil.Error:
            return
        if not children:
            return
        for signum in (signal.SIGSTOP, signal.SIGKILL):
            for child in children:
                try:
                    child.send_signal(signum)
                except psutil.Error:
                    pass


def registered() -> list[str]:
    """What the registered actions clean up, oldest first (for tests and debugging)."""
    with _lock:
        return [what for what, _ in _actions.values()]
