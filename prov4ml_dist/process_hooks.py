"""Process exit paths: a rank that never reaches ``end_run`` still closes its shard.

- normal interpreter exit (an exception escaped the training loop, ``sys.exit``, SIGINT's
  KeyboardInterrupt): ``atexit`` closes the shard, marked ``exited-without-end_run``;
- SIGTERM (what Slurm sends at the time limit) and SIGHUP: the handler closes the shard, then
  re-raises the signal with the default action so the exit status still says "killed by
  SIGTERM". Handlers are only installed where the user has none of their own, and only from
  the main thread.
SIGKILL cannot be caught: the SWMR shard then holds everything up to the last flush.

Three rules keep these paths safe (README, "Guarantees"):

- a signal that strikes the main thread inside its own flush or journal append does not close
  the shard under it: ``defer`` queues the close until that flush is done (a bounded wait);
- the hooks belong to the process that installed them: a forked child (DataLoader worker,
  ``multiprocessing`` helper) inherits them but they do nothing there — its ``atexit`` and a
  ``terminate()``'s SIGTERM never close the parent's shard; the child dies of the signal;
- ``remove`` works from any thread: off the main thread ``signal.signal`` is refused, so the
  handler stays installed and, with no hooks current, acts as the default action.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

_current: ExitHooks | None = None  # the hooks of the active run of this process
_replaced: dict[int, Any] = {}  # signal → the handler ours replaced (SIG_DFL or None), while ours is in place


class ExitHooks:
    """Installed by ``start_run``, removed by ``end_run``; ``close`` is called at most once.

    ``defer(action)`` queues ``action`` until the main thread leaves a flush and says True, or
    says False when there is none to wait for (``ShardWriter.defer``).
    """

    def __init__(self, close: Callable[[str], None], defer: Callable[[Callable[[], None]], bool] | None = None) -> None:
        global _current
        self._close = close
        self._defer = defer
        self._pid = os.getpid()
        atexit.register(self._at_exit)
        _current = self
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED_SIGNALS:
                previous = signal.getsignal(sig)
                if previous is _dispatch:  # left in place by an end_run from another thread
                    continue
                if previous in (signal.SIG_DFL, None):
                    _replaced[sig] = previous
                    signal.signal(sig, _dispatch)

    def remove(self) -> None:
        """Uninstall; from any thread (off the main thread the handler stays, inert)."""
        global _current
        atexit.unregister(self._at_exit)
        if _current is self:
            _current = None
        if threading.current_thread() is threading.main_thread():
            for sig, previous in list(_replaced.items()):
                if signal.getsignal(sig) is _dispatch:
                    signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
                del _replaced[sig]

    def _at_exit(self) -> None:
        if os.getpid() == self._pid:  # a forked child's exit is not this run's end
            self._safe_close("exited-without-end_run")

    def _on_signal(self, signum: int) -> None:
        if self._defer is not None and self._defer(lambda: self._close_and_die(signum)):
            log.warning("prov4ml_dist: %s received during a flush; closing the shard once it is done",
                        signal.Signals(signum).name)
            return
        self._close_and_die(signum)

    def _close_and_die(self, signum: int) -> None:
        self._safe_close(f"killed-by-{signal.Signals(signum).name}")
        self.remove()
        _die_of(signum)

    def _safe_close(self, status: str) -> None:
        try:
            self._close(status)
        except Exception as exc:  # noqa: BLE001 - exiting anyway; say why the shard may be short
            log.warning("prov4ml_dist: closing the shard failed: %s", exc)


def _dispatch(signum: int, frame: object) -> None:
    """The installed handler: the current hooks of this very process, else the default action."""
    hooks = _current
    if hooks is not None and hooks._pid == os.getpid():
        hooks._on_signal(signum)
    else:
        _die_of(signum)


def _die_of(signum: int) -> None:
    """The default action of ``signum`` (the only handler ours ever replaces): the exit status
    stays "killed by signum"."""
    signal.signal(signum, signal.SIG_DFL)
    _replaced.pop(signum, None)
    os.kill(os.getpid(), signum)
