"""One writer per run directory: an exclusive lock held for the life of a run.

The lock is a small JSON file beside the run directory, ``<exp_name>/.<seed>.lock`` (beside,
not inside, so that it exists before the directory does and stays put while ``--overwrite``
moves an old directory aside).  It names its owner: pid, host, start time and command.

* Taking it is atomic: the file is written in full under a temporary name and hard-linked
  into place (``link`` fails if the name exists), so nobody ever reads half a lock.
* The owner also holds ``flock`` on it, which the kernel drops when the process dies, even
  by SIGKILL.  A lock whose flock is free and whose owner is gone from this host (its pid
  absent, or reused by a process that started later) is stale: the next run takes it over
  and says so in train.log, so ``--resume`` after a kill needs no manual step.
* A live owner, or an owner on another host (whose processes cannot be checked from here),
  refuses the run with one line naming the owner and how to clear the lock.

Where flock is not available (some network file systems) the pid check alone decides.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from utils.errors import RunDirError

_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir).parent / f".{Path(run_dir).name}.lock"


def _process_start(pid: int) -> Optional[str]:
    """When ``pid`` started, in clock ticks since boot (/proc/<pid>/stat field 22): tells a
    reused pid from the process that wrote a lock.  None where /proc is not readable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode("ascii", "replace")
        return text.rsplit(")", 1)[1].split()[19]  # after "pid (comm)": field 3 is index 0
    except (OSError, IndexError):
        return None


@dataclass(frozen=True)
class LockOwner:
    pid: int
    host: str
    started: str
    process_start: Optional[str] = None
    command: str = ""

    @classmethod
    def me(cls) -> "LockOwner":
        command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
        return cls(pid=os.getpid(), host=socket.gethostname(),
                   started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   process_start=_process_start(os.getpid()), command=command[:300])

    @classmethod
    def from_bytes(cls, data: bytes) -> Optional["LockOwner"]:
        try:
            d = json.loads(data.decode("utf-8"))
            return cls(pid=int(d["pid"]), host=str(d["host"]), started=str(d["started"]),
                       process_start=d.get("process_start"), command=str(d.get("command", "")))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def to_bytes(self) -> bytes:
        return (json.dumps(self.__dict__, ensure_ascii=True) + "\n").encode("ascii")

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.started}"

    @property
    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """Still running (on this host), judged by the pid and its start time."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's process: it exists
        except OverflowError:
            return False
        now = _process_start(self.pid)
        return self.process_start is None or now is None or now == self.process_start


def _read_owner(path: Path) -> Optional[LockOwner]:
    try:
        with open(path, "rb") as fh:
            return LockOwner.from_bytes(fh.read(4096))
    except OSError:
        return None


def lock_refusal(run_dir: Path, owner: Optional[LockOwner]) -> RunDirError:
    """The one-line refusal of a run directory that ``owner`` holds."""
    return _refusal(run_dir, lock_path(run_dir), owner)


def _refusal(run_dir: Path, lock: Path, owner: Optional[LockOwner]) -> RunDirError:
    if owner is None:
        return RunDirError(f"run directory {run_dir} is in use by another process (lock file {lock}); wait for it "
                           f"to end, or, if no run is using it, delete {lock} and rerun")
    if not owner.on_this_host:
        return RunDirError(f"run directory {run_dir} is locked by {owner.describe()} (lock file {lock}), a host whose "
                           f"processes cannot be checked from {socket.gethostname()}; if that run has stopped, "
                           f"delete {lock} and rerun")
    return RunDirError(f"run directory {run_dir} is in use by {owner.describe()} (lock file {lock}); wait for that "
                       f"run to end, or, if it is no longer running, delete {lock} and rerun")


def live_owner(run_dir: Path) -> Optional[LockOwner]:
    """The owner of the run directory's lock if it may still be running (alive on this host,
    or on another host), else None.  Reads only: never takes the lock."""
    lock = lock_path(run_dir)
    if not lock.exists():
        return None
    owner = _read_owner(lock)
    if owner is None:
        return None  # unreadable: nobody can be named; the writer takes it over
    if not owner.on_this_host or owner.alive():
        return owner
    return None


class RunLock:
    """The exclusive lock of one run directory (``acquire`` ... ``release``)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = lock_path(self.run_dir)
        self.taken_over: Optional[LockOwner] = None  # the stale owner this lock replaced
        self._fd: Optional[int] = None
        self._created: list[Path] = []

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunDirError naming its owner; returns self."""
        self._make_parent()
        me = LockOwner.me()
        for _ in range(20):  # a lock released or replaced between two calls below: look again
            fd, tmp = self._write_candidate(me)
            flocked = self._try_flock(fd)
            try:
                _link_or_create(tmp, self.path, me)
            except FileExistsError:
                outcome = self._take_over_if_stale(fd, tmp, flocked)
                if outcome is not True:
                    os.close(fd)
                    _unlink(tmp)
                    if outcome is None:
                        continue
                    self.release()
                    raise outcome
            except OSError as exc:
                os.close(fd)
                _unlink(tmp)
                self.release()
                raise RunDirError(f"cannot create the lock file {self.path}: {exc.strerror or exc}") from None
            _unlink(tmp)
            self._fd = fd
            return self
        self.release()
        raise RunDirError(f"could not take the lock {self.path}: it kept changing (another run starting there?); "
                          "rerun")

    def _make_parent(self) -> None:
        parent = self.path.parent
        missing = [p for p in [parent, *parent.parents] if not p.exists()]
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create {parent}: {exc.strerror or exc}") from None
        self._created = missing  # deepest first: removed on release when the run never started

    def _write_candidate(self, me: LockOwner) -> tuple[int, str]:
        try:
            fd, tmp = tempfile.mkstemp(prefix=f"{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            os.write(fd, me.to_bytes())
            os.fsync(fd)
            return fd, tmp
        except OSError as exc:
            raise RunDirError(f"cannot write the lock file {self.path}: {exc.strerror or exc}") from None

    @staticmethod
    def _try_flock(fd: int) -> bool:
        """flock the candidate before it becomes the lock, so that it is held from its first moment."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno in _NO_FLOCK:
                return False
            raise

    def _take_over_if_stale(self, fd: int, tmp: str, flocked: bool):
        """True: the stale lock was replaced by ours; None: look again; else the error to raise."""
        try:
            existing = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return None  # released meanwhile
        except OSError as exc:
            return RunDirError(f"the lock file {self.path} cannot be opened ({exc.strerror or exc}); it must be a "
                               "file: remove it, then rerun")
        try:
            if flocked:
                try:
                    fcntl.flock(existing, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return _refusal(self.run_dir, self.path, _read_owner(self.path))
                try:
                    if os.fstat(existing).st_ino != os.stat(self.path).st_ino:
                        return None  # replaced while we locked the old one
                except FileNotFoundError:
                    return None
            owner = _read_owner(self.path)
            if owner is not None and (not owner.on_this_host or owner.alive()):
                return _refusal(self.run_dir, self.path, owner)
            if owner is None and os.fstat(existing).st_size == 0 and self._young(existing):
                time.sleep(0.05)  # created without a hard link just now: its owner is writing it
                return None
            os.replace(tmp, self.path)  # ours (already flocked) replaces the stale one atomically
            self.taken_over = owner or LockOwner(pid=-1, host="?", started="?")
            return True
        finally:
            os.close(existing)

    @staticmethod
    def _young(fd: int) -> bool:
        return time.time() - os.fstat(fd).st_mtime < 2.0

    def release(self) -> None:
        """Drop the lock (the file goes), and the folders made for it if the run never started."""
        if self._fd is not None:
            try:
                if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                    os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        for folder in self._created:
            try:
                folder.rmdir()  # only if empty: a run that started keeps its folders
            except OSError:
                break
        self._created = []

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _link_or_create(tmp: str, path: Path, me: LockOwner) -> None:
    """Put the candidate lock in place; FileExistsError if a lock is there.

    A hard link makes the complete file appear at once.  File systems without hard links
    (some SMB and FUSE mounts) get an exclusive create and a write instead, where a reader may
    briefly see an empty file (the takeover waits for it to fill or grow old)."""
    try:
        os.link(tmp, path)
        return
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
            raise
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, me.to_bytes())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)  # the flocked candidate takes the name: the lock is the file we hold


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
