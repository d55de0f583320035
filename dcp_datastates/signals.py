"""SIGINT (Ctrl-C) and SIGTERM abandon the saves in flight, the moment the signal is handled.

While a save is in flight we chain a handler in front of Python's default ones -- only
where the handler in place *is* the default (``default_int_handler`` for SIGINT,
``SIG_DFL`` for SIGTERM): a program's own handlers are left alone (they can call
``abandon_in_flight_saves()``). Handlers can only be set from the main thread, so they
are installed when a save starts there and put back from the main thread once no save is
in flight: when the next save starts or ends there, at the next optimizer step (the step
guard runs on the training thread), or in the handler itself. A save started off the
main thread relies on the exit hook of ``shutdown`` instead.

* **SIGINT**: cancel the saves in flight, remove their files, then do what Python does:
  raise ``KeyboardInterrupt`` in the main thread. The interrupted program ends as Ctrl-C
  ends it; the save threads it joins at exit stop at their next step.
* **SIGTERM**: cancel the saves in flight, wait (at most ``TERM_GRACE_S``) until their
  threads have stopped and removed their files, remove what is left, release the
  directory locks, then die of SIGTERM with the default action, so the exit status is the
  usual one (-15, or 143 in a shell). A save that is renaming its ``.metadata`` into place
  when the signal is handled is let finish first (milliseconds): then it is complete.

Python runs handlers on the main thread only, and only once it runs Python again; the kernel
may hand the signal to any thread that does not block it (ours block SIGINT and SIGTERM, see
``native.workers``; DCP's and torch's threads do not), and then a main thread asleep in
``time.sleep`` or stuck in a long C call would not notice. So while our handlers are in place
a watcher thread reads Python's wakeup fd (``signal.set_wakeup_fd``; only where no one else,
e.g. asyncio, uses it): it abandons the saves the moment the signal arrives, whichever thread
took it, and re-sends the signal to the main thread if its handler has not run within
``RESEND_AFTER_S``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from dcp_datastates import step_guard
from dcp_datastates.shutdown import InFlightSave, abandon_in_flight_saves, in_flight, wait_until_stopped

#: Longest a SIGTERM waits for the abandoned saves' threads to stop and remove their files.
TERM_GRACE_S = 5.0
#: The watcher re-sends a signal to the main thread when its handler has not run within this long.
RESEND_AFTER_S = 0.2

_DEFAULTS: dict[int, Any] = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
_replaced: dict[int, Any] = {}  # signal -> the default handler ours stands in front of
_lock = threading.Lock()
_handled = {signum: 0 for signum in _DEFAULTS}  # handler runs per signal ...
_received = {signum: 0 for signum in _DEFAULTS}  # ... and signals the watcher saw arrive
_wakeup: list[int] = []  # [read end, write end] of our wakeup fd pipe, while it is installed


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def cover_saves() -> None:
    """Put our handler in front of each default one (main thread only; a no-op elsewhere or if already in place)."""
    if not _on_main_thread():
        return
    with _lock:
        for signum, default in _DEFAULTS.items():
            if signum not in _replaced and signal.getsignal(signum) is default:
                signal.signal(signum, _handle)
                _replaced[signum] = default
        if _replaced and not _wakeup:
            _watch()
        step_guard.after_saves = restore_when_idle


def _watch() -> None:
    """Install our wakeup fd (unless someone else's is set) and start the watcher reading it."""
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    if previous != -1:  # asyncio's (or another library's): leave it to them
        signal.set_wakeup_fd(previous)
        os.close(read_end)
        os.close(write_end)
        return
    os.set_blocking(read_end, True)
    _wakeup[:] = [read_end, write_end]
    _received.update(_handled)  # from now on every handled signal is one the watcher sees
    watcher = threading.Thread(target=_watcher, args=(read_end, threading.main_thread().ident),
                               name="dcp-datastates-signals", daemon=True)
    from dcp_datastates.native.workers import start_without_interrupts

    start_without_interrupts(watcher)


def _watcher(read_end: int, main_ident: int) -> None:
    """Abandon the saves as soon as a signal arrives; wake the main thread if it did not notice."""
    while True:
        try:
            data = os.read(read_end, 64)
        except OSError:  # closed: our wakeup fd was removed
            return
        if not data:  # the write end was closed: our wakeup fd was removed
            os.close(read_end)
            return
        for signum in data:
            if signum not in _DEFAULTS:
                continue
            _received[signum] += 1
            name = signal.Signals(signum).name
            for save in abandon_in_flight_saves(f"interrupted by {name}{' (Ctrl-C)' if signum == signal.SIGINT else ''}"):
                save.remove_files()
            time.sleep(RESEND_AFTER_S)
            if _handled[signum] < _received[signum] and signum in _replaced:
                signal.pthread_kill(main_ident, signum)  # the main thread is asleep or another thread took it


def restore_when_idle() -> None:
    """Put the default handlers back once no save is in flight (main thread only; cheap when there is nothing to do)."""
    if not _replaced or not _on_main_thread() or in_flight():
        return
    with _lock:
        for signum, default in list(_replaced.items()):
            if signal.getsignal(signum) is _handle:  # a handler installed after ours stays
                signal.signal(signum, default)
            del _replaced[signum]
        if _wakeup:
            read_end, write_end = _wakeup
            del _wakeup[:]
            if signal.set_wakeup_fd(-1) != write_end:  # someone installed theirs after ours: keep it
                signal.set_wakeup_fd(signal.set_wakeup_fd(-1))
            os.close(write_end)  # the watcher reads EOF and ends


def die_of(signum: int) -> None:
    """End the process with ``signum``'s default action (the exit status a parent expects)."""
    for stream in (sys.stderr, sys.stdout):  # what was logged must not die in a buffer
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # only if the signal did not end us at once


def _handle(signum: int, frame: FrameType | None) -> None:
    _handled[signum] += 1
    name = signal.Signals(signum).name
    reason = f"interrupted by {name}{' (Ctrl-C)' if signum == signal.SIGINT else ''}"
    abandon_in_flight_saves(reason)
    cancelled = [save for save in in_flight() if save.abandoned]  # by us now, or by anyone before
    if signum == signal.SIGTERM:
        _terminate(signum, cancelled)
        return
    here = threading.current_thread()
    for save in cancelled:
        save.remove_files()  # safe at any time: nothing of a cancelled save will be published
        if save.driver is here:  # dcp.save on this thread: KeyboardInterrupt unwinds it, nothing more runs
            _release(save)
    if _in_async_save_bookkeeping(frame):
        # dcp.async_save is starting its upload thread after our stage() returned: a KeyboardInterrupt
        # there would leave a half-registered executor thread that the interpreter then waits for
        # forever. The saves are abandoned already; the KeyboardInterrupt comes a moment later.
        _send_again_soon(signum)
        return
    restore_when_idle()
    previous = _replaced.get(signum, signal.default_int_handler)
    previous(signum, frame)  # raises KeyboardInterrupt


def _in_async_save_bookkeeping(frame: FrameType | None) -> bool:
    """Whether ``frame`` is inside ``dcp.async_save`` but not inside our ``stage()`` (which cleans up after itself)."""
    from dcp_datastates.dcp_call import ASYNC_SAVE_CODE
    from dcp_datastates.writer import DataStatesWriter

    stage_code = DataStatesWriter.stage.__code__
    for _ in range(64):
        if frame is None:
            return False
        if frame.f_code is stage_code:
            return False
        if frame.f_code is ASYNC_SAVE_CODE:
            return True
        frame = frame.f_back
    return False


def _send_again_soon(signum: int) -> None:
    main = threading.main_thread().ident
    timer = threading.Timer(0.01, signal.pthread_kill, (main, signum))
    timer.daemon = True
    from dcp_datastates.native.workers import start_without_interrupts

    start_without_interrupts(timer)


def _terminate(signum: int, cancelled: list[InFlightSave]) -> None:
    here = threading.current_thread()
    committing_here = [s for s in in_flight() if s.committing and s.committer is here and s not in cancelled]
    if committing_here:  # the rename is under way on this very thread: die right after it
        committing_here[0].deferred_signal = signum
        return
    # Saves whose threads must stop and clean up: until they end, or -- for a save this very thread
    # drives (it is in this handler) -- until the threads it started have stopped.
    wait_until_stopped(in_flight(), here, TERM_GRACE_S)
    for save in cancelled:
        save.remove_files()
        _release(save)
    die_of(signum)


def _release(save: InFlightSave) -> None:
    if save.release is not None:
        try:
            save.release()
        except Exception:  # noqa: BLE001 - best effort while the process is going away
            pass
    save.end()
