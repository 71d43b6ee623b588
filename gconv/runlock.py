"""`lock.json`: one launch at a time in a run directory, on any storage."""
from __future__ import annotations

import datetime
import json
import os
import socket
import time
import uuid

from etils import epath

from gconv.storage import RunDirError, exists, to_json, write_text
from gconv.watchdog import watch

__all__ = ["RunLock"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`lock.json` in a run directory: who holds it (host, pid, start time) and a heartbeat, refreshed by `beat()`
    (the training loop calls it every step; it writes at most every `stale_after / 4` seconds). A second holder is
    refused; a lock whose holder is gone (same host: no such pid; elsewhere: no heartbeat for `stale_after`
    seconds) is taken over, with a line saying so."""

    def __init__(self, run_dir: epath.Path, stale_after: float = 600.0):
        self.path, self.stale_after = run_dir / "lock.json", stale_after
        self.token = uuid.uuid4().hex
        self._last_beat = 0.0
        self._info = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                      "started": datetime.datetime.now().isoformat(timespec="seconds")}

    def _holder_alive(self, info: dict) -> bool:
        if info.get("host") == socket.gethostname():
            return _pid_alive(int(info.get("pid", -1)))
        return time.time() - float(info.get("heartbeat", 0.0)) < self.stale_after

    def acquire(self) -> "RunLock":
        if exists(self.path):
            try:
                info = json.loads(self._read())
            except ValueError:
                info = {}
            if info.get("token") != self.token and self._holder_alive(info):
                age = time.time() - float(info.get("heartbeat", time.time()))
                raise RunDirError(
                    f"{self.path.parent} is in use by pid {info.get('pid')} on {info.get('host')} since "
                    f"{info.get('started')} (heartbeat {age:.0f} s ago): wait for that run, stop it, or pass "
                    f"another --workdir.")
            if info:
                print(f"note: taking over the lock of {self.path.parent} from pid {info.get('pid')} on "
                      f"{info.get('host')}, which is gone.", flush=True)
        self.beat(force=True)
        if json.loads(self._read()).get("token") != self.token:  # another launch won the race
            raise RunDirError(f"{self.path.parent} was taken by another launch at the same moment: pass another "
                              f"--workdir or retry.")
        return self

    def beat(self, force: bool = False) -> None:
        """Refreshes the heartbeat (if `stale_after / 4` seconds have passed since the last one)."""
        now = time.time()
        if force or now - self._last_beat >= self.stale_after / 4:
            write_text(self.path, to_json({**self._info, "heartbeat": now}))
            self._last_beat = now

    def release(self) -> None:
        try:
            if json.loads(self._read()).get("token") == self.token:
                with watch("delete", self.path):
                    self.path.unlink()
        except (FileNotFoundError, ValueError):
            pass

    def _read(self) -> str:
        with watch("read", self.path):
            return self.path.read_text()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
