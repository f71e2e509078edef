"""bench/gpu_check.py: its CPU mode (--quick) passes in CI, and one row's failure never stops the others."""
import json
import subprocess
import sys
import time

import pytest

from bench import gpu_check
from tests.conftest import ROOT

# rows that run on a CPU too: in --quick they must PASS, not SKIP (else the CPU mode proves nothing)
RUN_ON_CPU = ["environment", "synthetic CIFAR-100 (official pickles)", "stage 1: first.py WD + FR + ETF",
              "stage 2: second.py --retrain CB + WD + MaxNorm", "stage 2: second.py LA + tau sweep",
              "bf16 vs fp32 losses (same weights, batches)", "channels_last vs contiguous losses",
              "throughput A vs B (measurement)", "peak memory A, B", "SIGKILL mid-epoch, --resume: same acc.json",
              "resume with another memory format"]


def _summary_rows(path):
    """{check: (result, figure)} from summary.md's table."""
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[1] in ("PASS", "FAIL", "SKIP"):
            rows[cells[0]] = (cells[1], cells[3])
    return rows


@pytest.mark.slow
def test_quick_cpu_mode_passes_with_every_row(tmp_path):
    out = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out",
                          str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    rows = _summary_rows(tmp_path / "out" / "summary.md")
    assert list(rows) == [spec.name for spec in gpu_check.ROWS]
    assert {name for name, (result, _) in rows.items() if result not in ("PASS", "SKIP")} == set()
    assert [name for name in RUN_ON_CPU if rows[name][0] != "PASS"] == []
    for spec in gpu_check.ROWS:
        if spec.cuda_only:
            assert rows[spec.name] == ("SKIP", f"needs CUDA: {spec.cuda_only}")
    assert "acc.json identical" in rows["SIGKILL mid-epoch, --resume: same acc.json"][1]
    figures = json.loads((tmp_path / "out" / "figures.json").read_text())
    assert figures["environment"]["device"] == "cpu" and len(figures["rows"]) == len(gpu_check.ROWS)
    assert "killed run (exit status -9)" in (tmp_path / "out" / "gpu_check.log").read_text()
    assert "\ncheck " in out.stdout and "0 FAIL" in out.stdout  # the table, printed at the end


def _boom(ctx):
    raise RuntimeError("row one broke")


def _skip(ctx):
    raise gpu_check.Skip("not here")


def _hang(ctx):
    time.sleep(30)
    return "never"


def _fine(ctx):
    return "42 img/s"


def test_each_row_fails_alone_and_the_exit_status_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "ROWS", [
        gpu_check.RowSpec("raises", _boom, 1), gpu_check.RowSpec("skips", _skip, 1),
        gpu_check.RowSpec("hangs", _hang, 1), gpu_check.RowSpec("over budget", _fine, 1e6, optional=True),
        gpu_check.RowSpec("cuda only", _fine, 1, cuda_only="a GPU thing"), gpu_check.RowSpec("passes", _fine, 1)])
    monkeypatch.setattr(gpu_check.RowSpec, "limit_s", lambda self, quick: 0.5)
    rc = gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    assert rc == 1
    rows = _summary_rows(tmp_path / "summary.md")
    assert rows == {"raises": ("FAIL", "RuntimeError: row one broke"), "skips": ("SKIP", "not here"),
                    "hangs": ("FAIL", "ran past its time limit of 0.5 s"),
                    "over budget": rows["over budget"], "cuda only": ("SKIP", "needs CUDA: a GPU thing"), "passes": ("PASS", "42 img/s")}
    assert rows["over budget"][0] == "SKIP" and rows["over budget"][1].endswith("the row needs ~1000000 s")
    assert 'raise RuntimeError("row one broke")' in (tmp_path / "gpu_check.log").read_text()  # the traceback
    assert "2 FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--device", "cpu"], "error: --device cpu needs --quick"),
    (["--device", "tpu"], "error: --device tpu: use auto, cuda, cuda:N or cpu"),
])
def test_bad_device_is_one_line_and_exit_2(argv, message, capsys, tmp_path):
    assert gpu_check.main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().startswith(message)
    assert not (tmp_path / "o").exists()  # nothing written


def test_the_gpu_plan_fits_in_eight_minutes():
    """The expected H200 seconds (the script's docstring): the rows that always run plus one
    compile row within the default budget, which leaves the device call time to spare."""
    always = sum(spec.expected_s for spec in gpu_check.ROWS if not spec.optional)
    first_optional = next(spec.expected_s for spec in gpu_check.ROWS if spec.optional)
    assert f"sum to {always:.0f} s" in gpu_check.__doc__
    assert always + first_optional <= 420 < 8 * 60
