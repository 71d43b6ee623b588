"""`lock.json`: one launch at a time in a run directory, on any storage.

Every change of the lock is a conditional write against the generation its writer last saw: created only where
there is none (on GCS `ifGenerationMatch=0`; on a file system tensorstore's file store, which writes under a lock
file and a rename), refreshed and released only while it is still the generation this holder wrote. Of launches
that race for one directory exactly one wins, and a holder whose lock was taken over (`--takeover`) finds out at
its next heartbeat and stops in one line (exit code `EXIT_CODE`) without writing anything more.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
import uuid

from etils import epath

from gconv import watchdog
from gconv.storage import RunDirError, is_remote

__all__ = ["RunLock", "EXIT_CODE"]

EXIT_CODE = 73  # the lock was taken over: this launch stopped and wrote nothing more


class _FileStore:
    """One object of a file system (or of a store tensorstore writes conditionally, `s3://`) with generations:
    `read() -> (bytes | None, generation)`, `write(data | None, if_generation) -> new generation | None`."""
    missing = b"\x02"  # tensorstore's generation of a key that does not exist

    def __init__(self, path: epath.Path):
        import tensorstore as ts

        text = os.fspath(path)
        if is_remote(text):
            scheme, _, rest = text.partition("://")
            bucket, _, key = rest.partition("/")
            spec = {"driver": scheme, "bucket": bucket, "path": key.rpartition("/")[0] + "/"}
        else:
            spec = {"driver": "file", "path": os.path.dirname(text) + "/"}
        self.name = os.path.basename(text)
        self.store = ts.KvStore.open(spec).result()

    def read(self) -> tuple[bytes | None, bytes]:
        result = self.store.read(self.name).result()
        return (result.value if result.state == "value" else None), result.stamp.generation

    def write(self, data: bytes | None, generation: bytes) -> bytes | None:
        written = self.store.write(self.name, data, if_equal=generation).result().generation
        return written or None  # an empty generation: the condition did not hold


class _GcsStore:
    """The same on Google Cloud Storage through its JSON API (gcsfs's client, credentials and retries):
    multipart uploads and deletes with `ifGenerationMatch`."""
    missing = b"0"

    def __init__(self, path: epath.Path):
        import fsspec

        self.bucket, _, self.key = os.fspath(path).partition("://")[2].partition("/")
        self.fs = fsspec.filesystem("gs")

    def read(self) -> tuple[bytes | None, bytes]:
        try:
            headers, data = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media")
        except FileNotFoundError:
            return None, self.missing
        return data, headers["X-Goog-Generation"].encode()

    def write(self, data: bytes | None, generation: bytes) -> bytes | None:
        try:
            if data is None:
                self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=generation.decode())
                return self.missing
            part = f"--==0==\nContent-Type: application/json\n\n{json.dumps({'name': self.key})}\n--==0==\n" \
                   f"Content-Type: application/json\n\n"
            upload = self.fs.base.replace("/storage/v1/", "/upload/storage/v1/")  # the JSON API's upload endpoint
            reply = self.fs.call("POST", f"{upload}b/{self.bucket}/o",
                                 uploadType="multipart", ifGenerationMatch=generation.decode(), json_out=True,
                                 headers={"Content-Type": 'multipart/related; boundary="==0=="'},
                                 data=part.encode() + data + b"\n--==0==--")
        except (FileExistsError, FileNotFoundError):  # gcsfs's names for 412 Precondition Failed and 404
            return None
        return str(reply["generation"]).encode()


def _store(path: epath.Path) -> _FileStore | _GcsStore:
    return _GcsStore(path) if os.fspath(path).startswith("gs://") else _FileStore(path)


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
    (the training loop calls it every step; it writes at most every `stale_after / 4` seconds). A second launch is
    refused; a lock whose holder is gone (same host: no such pid; elsewhere: no heartbeat for `stale_after`
    seconds) is taken over, with a line saying so; `acquire(takeover=True)` takes any lock (its holder's host is
    gone, the user says)."""

    def __init__(self, run_dir: epath.Path, stale_after: float = 600.0):
        self.path, self.stale_after = run_dir / "lock.json", stale_after
        self.token = uuid.uuid4().hex
        self.generation: bytes | None = None  # of the lock this holder wrote last; None: not held
        self._last_beat = 0.0
        self._info = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                      "started": datetime.datetime.now().isoformat(timespec="seconds")}
        with watchdog.watch("open", self.path):
            self._store = _store(self.path)

    def _holder_alive(self, info: dict) -> bool:
        if info.get("host") == socket.gethostname():
            return _pid_alive(int(info.get("pid", -1)))
        return time.time() - float(info.get("heartbeat", 0.0)) < self.stale_after

    def _read(self) -> tuple[dict | None, bytes]:
        with watchdog.watch("read", self.path):
            data, generation = self._store.read()
        if data is None:
            return None, generation
        try:
            info = json.loads(data)
        except ValueError:
            info = {}
        return (info if isinstance(info, dict) else {}), generation

    def _write(self, generation: bytes) -> bytes | None:
        """Writes this holder's record if the lock is still at `generation`: the new generation, else None."""
        now = time.time()
        with watchdog.watch("write", self.path):
            written = self._store.write(json.dumps({**self._info, "heartbeat": now}).encode(), generation)
        self._last_beat = now
        if written is None:  # the condition failed, or a retried request found its first attempt already written
            info, current = self._read()
            written = current if info is not None and info.get("token") == self.token else None
        return written

    def acquire(self, takeover: bool = False) -> "RunLock":
        """Holds the lock or raises `RunDirError` naming its holder. `takeover`: take it even from a holder that
        looks alive (a host that is gone, whose heartbeat has not yet aged `stale_after`)."""
        info, generation = self._read()
        if info is not None:
            age = time.time() - float(info.get("heartbeat", time.time()))
            holder = (f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')} (heartbeat {age:.0f} "
                      f"s ago)")
            if not takeover and self._holder_alive(info):
                elsewhere = info.get("host") != socket.gethostname()
                raise RunDirError(f"{self.path.parent} is in use by {holder}: wait for that run, stop it, or pass "
                                  f"another --workdir" + ("; if that host is gone, relaunch with --takeover."
                                                          if elsewhere else "."))
            print(f"note: taking over the lock of {self.path.parent} from {holder}"
                  f"{'' if takeover else ', which is gone'}.", flush=True)
        written = self._write(generation)
        if written is None:
            raise RunDirError(f"{self.path.parent} was taken by another launch at the same moment: pass another "
                              f"--workdir or retry.")
        self.generation = written
        watchdog.hold(self.path)
        return self

    def beat(self, force: bool = False) -> None:
        """Refreshes the heartbeat (if `stale_after / 4` seconds have passed since the last one). A lock taken
        over since ends the process here, in one line, before anything more is written."""
        if self.generation is None or not (force or time.time() - self._last_beat >= self.stale_after / 4):
            return
        written = self._write(self.generation)
        if written is None:
            self._lost()
        self.generation = written

    def _lost(self) -> None:
        info, _ = self._read()
        by = f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}" if info else "a release"
        print(f"error: the lock of {self.path.parent} was taken over by {by}: this launch stopped and wrote nothing "
              f"more (exit {EXIT_CODE}).", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_CODE)

    def release(self) -> None:
        """Deletes the lock if this holder's generation is still the current one."""
        if self.generation is None:
            return
        with watchdog.watch("delete", self.path):
            self._store.write(None, self.generation)
        watchdog.release(self.path)
        self.generation = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
