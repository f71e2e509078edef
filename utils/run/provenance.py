"""The code and the machine a run's results came from: ``provenance.json`` beside args.json.

One entry per start of the run (a resumed run adds one): the git commit of this checkout and
whether tracked files differed from it (``git`` missing or the folder not a repository is said
so, never an error), the Python, torch, CUDA and cuDNN versions, the GPU, the host, the command
line and the start time.  args.json stays the run's config alone, re-loadable with --json_path.
"""
from __future__ import annotations

import datetime
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from utils.config.load import read_json_file
from utils.errors import UserError
from utils.names import PROVENANCE_FILE
from utils.run.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]  # the checkout whose code runs (this file: utils/run/provenance.py)
GIT_TIMEOUT_S = 10


def git_state(root: Path = ROOT) -> dict:
    """{"commit", "dirty"} of ``root``, or both None and a "note" saying why there is none."""
    try:
        head = _git(root, "rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None, "note": f"{root} is not a git repository"}
        # tracked files only (git describe --dirty's rule): untracked run outputs are not code
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
    except FileNotFoundError:
        return {"commit": None, "dirty": None, "note": "git is not installed"}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"commit": None, "dirty": None, "note": f"git failed: {type(exc).__name__}: {exc}"[:200]}
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return {"commit": head.stdout.strip(), "dirty": dirty}


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)


def machine(device: torch.device) -> dict:
    """Versions and hardware of this process."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": sys.version.split()[0],
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "host": socket.gethostname(),
        "platform": platform.platform(),
    }


def this_start(device: torch.device, resumed_after: Optional[int], started: datetime.datetime) -> dict:
    return {"started": started.isoformat(timespec="seconds"), "resumed_after_epoch": resumed_after,
            "command": list(sys.argv), "code": git_state(), **machine(device)}


def record_start(rundir: RunDir, device: torch.device, resumed_after: Optional[int] = None) -> dict:
    """Write provenance.json: the starts before (kept when resuming) and this one."""
    started = datetime.datetime.now().astimezone()
    starts = _earlier_starts(rundir) if resumed_after is not None else []
    record = {"starts": starts + [this_start(device, resumed_after, started)]}
    rundir.write_json(PROVENANCE_FILE, record)
    return record


def _earlier_starts(rundir: RunDir) -> list:
    """The starts an earlier provenance.json lists; none when it is missing or unreadable
    (the record is for the reader, it never stops a run)."""
    path = rundir.file(PROVENANCE_FILE)
    if not path.is_file():
        return []
    try:
        earlier = read_json_file(path, str(path), UserError)
    except UserError:
        return []
    starts = earlier.get("starts") if isinstance(earlier, dict) else None
    return list(starts) if isinstance(starts, list) else []
