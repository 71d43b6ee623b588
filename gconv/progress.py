"""Training progress for people watching: a bar on a terminal, else (a batch job's log) a line every
`interval` seconds with the step, throughput and time left (only process 0 reports); and profiler traces of
chosen steps."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

__all__ = ["Progress", "StepProfiler"]


class Progress:
    """`update(step, batch_size)` after each step; `note(text)` prints a line (eval results); `close()` at the end."""

    def __init__(self, name: str, start_step: int, total_steps: int, enabled: bool = True,
                 interval: float = 30.0, stream=None):
        self.name, self.total, self.interval = name, total_steps, interval
        self.stream = stream or sys.stderr
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = enabled
        self.bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True,
                        file=self.stream, disable=not (enabled and tty))
        self.lines = enabled and not tty
        self._mark = (time.time(), start_step)  # the time and step of the last line
        self._first = None  # (time, step) after the first step of the session, which includes compilation

    def update(self, step: int, batch_size: int, **postfix: str) -> None:
        now = time.time()
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix(**postfix)
        if self._first is None:  # no rate to tell before the step that compiled has passed
            self._first = (now, step)
            return
        if not self.lines or now - self._mark[0] < self.interval:
            return
        since = max(self._mark, self._first)  # the later of the last line and the end of the first step
        rate = (step - since[1]) / max(now - since[0], 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        print(f"{self.name} step {step}/{self.total}: {rate * batch_size:,.0f} img/s, "
              f"{_duration(now - self._mark[0])} since the last line, ETA {_duration(eta)}",
              file=self.stream, flush=True)
        self._mark = (now, step)

    def note(self, text: str) -> None:
        if self.bar.disable:
            if self.enabled:
                print(f"{self.name} {text}", flush=True)
        else:
            self.bar.write(f"{self.name} {text}")

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class StepProfiler:
    """A `jax.profiler` trace of training steps `a` to `b` (1-based, inclusive; `spec` "a,b", or "" for none) in
    `out_dir` (local, or copied there afterwards when it is remote). Open it with TensorBoard's profile plugin or
    Perfetto (`*.trace.json.gz`)."""

    def __init__(self, spec: str, out_dir):
        self.first = self.last = None
        self.out_dir, self.active = out_dir, False
        if spec:
            self.first, self.last = parse_steps(spec)

    def before(self, step: int) -> None:
        if step == self.first:
            import jax

            from gconv import storage

            self._local = storage.local_dir_for(self.out_dir, "gconv-profile-")
            jax.profiler.start_trace(self._local)
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step == self.last:
            import jax

            jax.block_until_ready(state)  # the steps' work, not just their dispatch
            self.close()

    def close(self) -> None:
        if not self.active:
            return
        import jax

        from gconv import storage

        jax.profiler.stop_trace()
        self.active = False
        storage.mirror(self._local, self.out_dir)


def parse_steps(spec: str) -> tuple[int, int]:
    """"a,b" -> (a, b) with 1 <= a <= b; anything else raises `ValueError` saying the form."""
    parts = spec.replace(" ", "").split(",")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 1 <= int(parts[0]) <= int(parts[1]):
        raise ValueError(f"profile_steps={spec!r}: use 'a,b', the first and last training step to trace "
                         f"(1 <= a <= b), e.g. --config.profile_steps=10,12.")
    return int(parts[0]), int(parts[1])
