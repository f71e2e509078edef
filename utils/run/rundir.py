"""The run directory: every file a run writes goes through here.

Writes are atomic (temporary file in the same folder, then ``os.replace``),
so a run that dies never leaves a half-written json, csv or checkpoint.
Checkpoints are read back with ``weights_only=True`` only.  Under torchrun the
ranks other than 0 hold a :class:`FollowerRunDir`, whose writers do nothing
(utils/run/runlog.py decides which rank writes).
"""
from __future__ import annotations

import csv
import io
import json
import os
import pickle
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from utils.errors import RunDirError

# mkstemp creates files readable by the owner only; run files get the usual umask permissions.
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, then rename it over ``path``.

    A full disk or a killed process leaves the previous version of ``path`` intact.
    """
    atomic_write(path, lambda fh: fh.write(data))


def _open_temporary(fd: int, path: Path):
    """The file object a write goes through (a seam for tests that simulate a full disk)."""
    return os.fdopen(fd, "wb")


def _os_error_in(exc: BaseException):
    """The OSError behind an exception: torch.save reports a failed write of its file object
    as a RuntimeError of its own, with the OSError as its context."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def atomic_write(path: Path, write) -> None:
    """``write(binary file)`` into a temporary file, fsync, then rename it over ``path``.

    This is the one write path of a run's files (torch.save included).  A full disk, an I/O
    error or a killed process leaves the previous version of ``path`` intact and no temporary
    file; a failed write is one line, RunDirError.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with _open_temporary(fd, path) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        cause = _os_error_in(exc) if isinstance(exc, Exception) else None
        if cause is not None:
            raise RunDirError(f"cannot write {path}: {cause.strerror or cause} (its previous version, if any, "
                              "is kept; free space or fix permissions, then rerun with --resume)") from None
        raise


def safe_join(root: Path, relative: Path, what: str = "run directory", error: type = RunDirError) -> Path:
    """root/relative resolved (symbolic links and '..' followed), refusing anything outside root."""
    root_resolved = Path(root).resolve()
    target = (root_resolved / relative).resolve()
    if target != root_resolved and root_resolved not in target.parents:
        raise error(f"{what} {relative} would escape {root} (it resolves to {target})")
    return target


class RunDir:
    writes = True  # False for the ranks that leave the writing to rank 0 (FollowerRunDir)

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, exp_root: Path, relative: Path) -> "RunDir":
        """Make exp_root/relative (checked to stay inside exp_root) and check it is writable."""
        path = safe_join(Path(exp_root), Path(relative))
        created = [p for p in [path, *path.parents] if not p.exists()]
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write_probe"
            probe.write_bytes(b"")
            probe.unlink()
        except (OSError, ValueError) as exc:
            for folder in created:  # leave no partial run directory behind
                try:
                    folder.rmdir()
                except OSError:
                    pass
            raise RunDirError(f"cannot write to run directory {path}: {getattr(exc, 'strerror', None) or exc}") from None
        return cls(path)

    def file(self, name: str) -> Path:
        return self.path / name

    # --- atomic writers ---
    def write_text(self, name: str, text: str) -> Path:
        atomic_write_bytes(self.file(name), text.encode("utf-8"))
        return self.file(name)

    def write_json(self, name: str, obj: Any) -> Path:
        text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
        if not _encodable(text):  # a lone surrogate in free text: JSON's \\uXXXX escapes keep it exactly
            text = json.dumps(obj, indent=2, ensure_ascii=True) + "\n"
        return self.write_text(name, text)

    def save_torch(self, name: str, obj: Any) -> Path:
        # streamed into the temporary file: a 170 MB checkpoint is not first built in memory
        atomic_write(self.file(name), lambda fh: torch.save(obj, fh))
        return self.file(name)

    def save_npy(self, name: str, array: np.ndarray) -> Path:
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        atomic_write_bytes(self.file(name), buf.getvalue())
        return self.file(name)

    def write_csv(self, name: str, header: list[str], rows: Iterable[Iterable[Any]]) -> Path:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for row in rows:
            writer.writerow([_fmt(v) for v in row])
        return self.write_text(name, buf.getvalue())

    def append_line(self, name: str, line: str) -> None:
        # Logs grow line by line; a crash loses at most the line being written.
        try:
            # backslashreplace: a lone surrogate in free text is logged escaped instead of ending the run
            with open(self.file(name), "a", encoding="utf-8", errors="backslashreplace") as fh:
                fh.write(line.rstrip("\n") + "\n")
        except OSError as exc:
            raise RunDirError(f"cannot write {self.file(name)}: {exc.strerror or exc}") from None

    # --- renames and deletions inside the run directory ---
    def replace(self, name: str, target: str) -> None:
        """Rename ``name`` over ``target`` (atomic: the target is the old file or the new one)."""
        os.replace(self.file(name), self.file(target))

    def remove(self, name: str) -> None:
        self.file(name).unlink(missing_ok=True)

    def remove_all(self) -> None:
        """Delete the whole run directory (a new run that failed before its first checkpoint)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def summary_writer(self, **options):
        """A TensorBoard SummaryWriter writing into the run directory."""
        from torch.utils.tensorboard import SummaryWriter  # loaded by the runs that log, not by every import
        return SummaryWriter(log_dir=str(self.path), **options)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _unsafe_message(named: str = "") -> str:
    return (f"it holds pickled objects other than tensors and plain containers{named}, which could run code "
            "when loaded; it was not loaded (weights_only=True)")


def load_state_dict(path: Path, mmap: bool = False) -> Any:
    """A file saved with torch.save, loaded safely (weights only).

    Errors are normalised so that callers can tell the two failures apart:
    ``pickle.UnpicklingError`` for a file carrying objects that could run code
    (refused, never executed), ``ValueError`` for anything unreadable (truncated,
    empty, not a torch file).  ``OSError`` (missing, permissions) passes through.
    """
    try:
        with warnings.catch_warnings():  # torch's notes on old pickle protocols are not the user's concern
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler refuses any global (class or function) it does not allow;
        # anything else it trips on is a damaged file.
        named = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if named or "global" in str(exc).lower():
            raise pickle.UnpicklingError(_unsafe_message(f" (here {named.group(1)})" if named else "")) from None
        raise ValueError(f"not a complete torch checkpoint ({_weights_only_reason(exc)})") from None
    except OSError:
        raise
    except Exception as exc:  # truncated zip, empty file, garbage bytes (KeyError, EOFError, RuntimeError...)
        raise ValueError(f"not a complete torch checkpoint ({type(exc).__name__}: {_first_line(exc)})") from None


def _weights_only_reason(exc: BaseException) -> str:
    found = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
    return found.group(1).strip()[:200] if found else _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class FollowerRunDir(RunDir):
    """The run directory as seen by a rank other than 0 under torchrun.

    Every rank runs the same code, and only rank 0 writes: here every writer does
    nothing (reads still work, on a shared filesystem)."""

    writes = False

    def write_text(self, name: str, text: str) -> Path:
        return self.file(name)

    def save_torch(self, name: str, obj: Any) -> Path:
        return self.file(name)

    def save_npy(self, name: str, array: np.ndarray) -> Path:
        return self.file(name)

    def append_line(self, name: str, line: str) -> None:
        return None

    def replace(self, name: str, target: str) -> None:
        return None

    def remove(self, name: str) -> None:
        return None

    def remove_all(self) -> None:
        return None

    def summary_writer(self, **options) -> "NullWriter":
        return NullWriter()


class NullWriter:
    """TensorBoard's SummaryWriter for the ranks that do not write: every attribute, and every
    attribute of those (``writer.file_writer.add_summary``), is a call that does nothing."""

    def __getattr__(self, name):
        return self

    def __call__(self, *args, **kwargs) -> None:
        return None
