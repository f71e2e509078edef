"""Ctrl-C and SIGTERM during training: finish the epoch, save its checkpoint, stop."""
from __future__ import annotations

import signal
import sys
import threading

from utils.run import runlog


class GracefulStop:
    """First Ctrl-C (or SIGTERM, as clusters send before killing a job): ``requested`` becomes
    true, and the training loop stops after the current epoch and its checkpoint.  A second
    one stops at once (the checkpoint of the last completed epoch stays).

    A context manager: the handlers are installed for the epochs only, so that Ctrl-C
    during the final evaluation stops at once (``--resume`` redoes only the evaluation)."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> "GracefulStop":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum, frame) -> None:
        if self.requested:
            self.uninstall()
            raise KeyboardInterrupt
        self.requested = True
        # under torchrun every process gets the signal; one says so
        runlog.say("\ninterrupt: finishing this epoch and saving its checkpoint (press Ctrl-C again to stop at once)",
                   sys.stderr)
