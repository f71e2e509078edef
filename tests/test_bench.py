"""The benchmark runs end to end (a smoke test: its figures are not checked here)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_benchmark_prints_both_pipelines_and_the_ratio():
    out = subprocess.run(
        [sys.executable, "bench/throughput.py", "--device", "cpu", "--model", "ResNet18", "--batch-size", "8",
         "--steps", "1", "--warmup", "1", "--rounds", "1", "--eval-images", "16", "--workers", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "A: this project" in out.stdout and "B: naive" in out.stdout
    assert "ratio A / B: train" in out.stdout
