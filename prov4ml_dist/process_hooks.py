"""Process exit paths: a rank that never reaches ``end_run`` still closes its shard.

- normal interpreter exit (an exception escaped the training loop, ``sys.exit``, SIGINT's
  KeyboardInterrupt): ``atexit`` closes the shard, marked ``exited-without-end_run``;
- SIGTERM (what Slurm sends at the time limit) and SIGHUP: the handler closes the shard, then
  hands the signal to the previous handler — or re-raises it with the default action so the
  exit status still says "killed by SIGTERM". Handlers are only installed where the user has
  none of their own, and only from the main thread.
SIGKILL cannot be caught: the SWMR shard then holds everything up to the last flush.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class ExitHooks:
    """Installed by ``start_run``, removed by ``end_run``; ``close`` is called at most once."""

    def __init__(self, close: Callable[[str], None]) -> None:
        self._close = close
        self._previous: dict[int, object] = {}
        atexit.register(self._at_exit)
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED_SIGNALS:
                previous = signal.getsignal(sig)
                if previous in (signal.SIG_DFL, None):
                    self._previous[sig] = previous
                    signal.signal(sig, self._on_signal)

    def remove(self) -> None:
        atexit.unregister(self._at_exit)
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _at_exit(self) -> None:
        self._safe_close("exited-without-end_run")

    def _on_signal(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        log.warning("prov4ml_dist: %s received; closing the shard before exiting", name)
        self._safe_close(f"killed-by-{name}")
        self.remove()
        os.kill(os.getpid(), signum)  # default action now: the exit status stays "killed by signum"

    def _safe_close(self, status: str) -> None:
        try:
            self._close(status)
        except Exception as exc:  # noqa: BLE001 - exiting anyway; say why the shard may be short
            log.warning("prov4ml_dist: closing the shard failed: %s", exc)
