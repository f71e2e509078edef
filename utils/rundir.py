"""The run directory: every file a run writes goes through here.

Writes are atomic (temporary file in the same folder, then ``os.replace``),
so a run that dies never leaves a half-written json, csv or checkpoint.
Checkpoints are read back with ``weights_only=True`` only.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from utils.errors import RunDirError  # noqa: F401  (re-exported)

ARGS_FILE = "args.json"
BEST_PARAM_FILE = "best.paramOnly"
ACC_FILE = "acc.json"
FDR_FILE = "fdr.json"
SPARSITY_FILE = "sparsity.json"
CONFMAT_FILE = "confMat.npy"
TRAIN_LOG_FILE = "train.log"
BEST_LOG_FILE = "note_bestModel.log"
METRICS_FILE = "metrics.csv"
PER_CLASS_FILE = "per_class.csv"
TRACK_RECORDS_FILE = "trackRecords.ckpt"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def safe_join(root: Path, relative: Path) -> Path:
    """root/relative, refusing anything that resolves outside root."""
    root_resolved = Path(root).resolve()
    target = (root_resolved / relative).resolve()
    if target != root_resolved and root_resolved not in target.parents:
        raise RunDirError(f"run directory {relative} would escape {root}")
    return target


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, exp_root: Path, relative: Path) -> "RunDir":
        """Make exp_root/relative (checked to stay inside exp_root) and check it is writable."""
        path = safe_join(Path(exp_root), Path(relative))
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".write_probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise RunDirError(f"cannot write to run directory {path}: {exc.strerror or exc}") from None
        return cls(path)

    def file(self, name: str) -> Path:
        return self.path / name

    # --- atomic writers ---
    def write_text(self, name: str, text: str) -> Path:
        atomic_write_bytes(self.file(name), text.encode("utf-8"))
        return self.file(name)

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    def save_torch(self, name: str, obj: Any) -> Path:
        buf = io.BytesIO()
        torch.save(obj, buf)
        atomic_write_bytes(self.file(name), buf.getvalue())
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
        with open(self.file(name), "a", encoding="utf-8") as fh:
            fh.write(line.rstrip("\n") + "\n")


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def load_state_dict(path: Path) -> dict:
    """A plain state_dict saved with torch.save, loaded safely (weights only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
