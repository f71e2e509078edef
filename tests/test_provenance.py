"""provenance.json (utils/run/provenance.py): the code and the machine beside each run's results."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch

from tests.conftest import ROOT
from utils.run import provenance
from utils.names import PROVENANCE_FILE
from utils.run.rundir import RunDir

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


@needs_git
def test_the_commit_and_dirty_flag_of_a_repository(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for args in (["init", "-q"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty",
                                   "-m", "empty"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
    (repo / "code.py").write_text("x = 1\n")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert provenance.git_state(repo) == {"commit": head, "dirty": False}, "an untracked file is not a change"
    subprocess.run(["git", "-C", str(repo), "add", "code.py"], check=True)
    assert provenance.git_state(repo) == {"commit": head, "dirty": True}


def test_no_repository_or_no_git_is_said_so(tmp_path, monkeypatch):
    if shutil.which("git") is not None:
        state = provenance.git_state(tmp_path)
        assert state["commit"] is None and state["dirty"] is None and "is not a git repository" in state["note"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git anywhere
    assert provenance.git_state(ROOT) == {"commit": None, "dirty": None, "note": "git is not installed"}


def test_each_start_is_recorded_and_a_resume_keeps_the_earlier_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "git_state", lambda root=ROOT: {"commit": "abc", "dirty": False})
    monkeypatch.setattr(provenance.sys, "argv", ["first.py", "--json_path", "cfg.json"])
    rundir = RunDir(tmp_path)
    provenance.record_start(rundir, torch.device("cpu"))
    provenance.record_start(rundir, torch.device("cpu"), resumed_after=3)
    starts = json.loads((tmp_path / PROVENANCE_FILE).read_text())["starts"]
    assert [s["resumed_after_epoch"] for s in starts] == [None, 3]
    first = starts[0]
    assert first["code"] == {"commit": "abc", "dirty": False}
    assert first["command"] == ["first.py", "--json_path", "cfg.json"]
    assert first["torch"] == str(torch.__version__) and first["device"] == "cpu" and first["gpu"] is None
    assert first["cuda"] == torch.version.cuda and first["python"] and first["host"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", first["started"])
    # a new run (not a resume) starts the list afresh; an unreadable earlier file is dropped, never an error
    provenance.record_start(rundir, torch.device("cpu"))
    assert len(json.loads((tmp_path / PROVENANCE_FILE).read_text())["starts"]) == 1
    (tmp_path / PROVENANCE_FILE).write_text("{not json")
    provenance.record_start(rundir, torch.device("cpu"), resumed_after=1)
    assert len(json.loads((tmp_path / PROVENANCE_FILE).read_text())["starts"]) == 1


def test_the_recorded_checkout_is_the_one_that_runs():
    # the module's place in utils/ decides where it looks: it must find the repository's root
    assert (provenance.ROOT / "first.py").is_file() and (provenance.ROOT / "utils").is_dir()
