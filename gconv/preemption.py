"""Stopping a run cleanly: SIGTERM (preemption) or SIGINT make the loop save a checkpoint and stop.

In a multi-process run SIGTERM is left to JAX's preemption service: whichever process receives it, every process
reaches the same sync step (`multihost_utils.reached_preemption_sync_point`, polled every step), saves it and stops.
SIGINT there keeps its default (it reaches one process only, and saving is collective).
"""
from __future__ import annotations

import signal
from typing import Any

__all__ = ["Stopped", "StopFlag"]


class Stopped(Exception):
    """Raised after a checkpoint was saved because of SIGTERM (preemption) or SIGINT; relaunch to resume."""

    def __init__(self, signum: int, step: int, run_dir: Any):
        self.signum, self.step = signum, step
        super().__init__(f"{signal.Signals(signum).name}: saved checkpoint at step {step} in {run_dir}; "
                         f"relaunch to resume.")


class StopFlag:
    """Context manager catching SIGTERM/SIGINT for the training loop; a second SIGINT interrupts at once."""

    def __init__(self, multiprocess: bool = False):
        self.signum, self.multiprocess = None, multiprocess
        self._previous = {}

    def __enter__(self):
        for sig in () if self.multiprocess else (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def poll(self, step: int) -> int | None:
        """The signal to stop for after training step `step` (every process calls it at every step), or None."""
        if self.multiprocess and self.signum is None:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = signal.SIGTERM
        return self.signum

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False
