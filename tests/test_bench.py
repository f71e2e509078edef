"""bench/throughput.py: it credits the images actually trained, and it runs end to end."""
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from bench import throughput
from tests.conftest import ROOT
from utils.engine.train import SplitTensors

N_IMAGES, BATCH = 100, 16  # 6 full batches + one of 4


def _tiny_data():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(throughput.N_CLASSES)  # one image per class
    images = torch.randint(0, 256, (N_IMAGES, 3, 32, 32), generator=g, dtype=torch.uint8)
    return {"counts": [1] * throughput.N_CLASSES, "train": SplitTensors(images, labels),
            "val": SplitTensors(images[:32], labels[:32])}


def _args(**kw):
    # BNMLP: the benchmark's config (ETF, weight decay, feature regularisation) on a tiny network
    base = dict(batch_size=BATCH, eval_batch_size=16, sgd_impl="auto", current_model="BNMLP", seed=0, warmup=1,
                steps=50, epoch="estimate", workers=0)
    return SimpleNamespace(**{**base, **kw})


class _OneSecondPerReading:
    """A clock that advances 1 s per reading: a rate over one timed interval equals the count credited."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now


def test_batch_sizes_follow_the_training_loop():
    assert throughput.epoch_batch_sizes(100, 16) == [16] * 6 + [4]
    assert throughput.epoch_batch_sizes(10_457, 64) == [64] * 163 + [25]  # CIFAR-100-LT, 164 batches
    assert throughput.epoch_batch_sizes(97, 16) == [16] * 6  # a last batch of one image is dropped
    assert throughput.timed_steps(_args(steps=300, batch_size=64), 10_457) == 164


def test_trained_images_counts_the_steps_that_ran():
    out = {"step_loss": torch.zeros(7)}  # train_one_epoch's losses: one per step run
    assert throughput.trained_images(out, N_IMAGES, BATCH) == N_IMAGES
    assert throughput.trained_images({"step_loss": torch.zeros(3)}, N_IMAGES, BATCH) == 48
    assert throughput.trained_images({"images": 77, "step_loss": torch.zeros(7)}, N_IMAGES, BATCH) == 77


@pytest.mark.parametrize("pipeline", ["A", "B"])
def test_steps_beyond_an_epoch_credit_only_the_images_trained(monkeypatch, pipeline):
    """--steps 50 asks for more than the 7 batches of an epoch: the loop stops at the epoch's
    end, and the images/s must count the 100 images trained (B: the 84 left after its one
    warm-up step), not 50 x 16 = 800 (the defect: A's CUDA figure came out 1.84x too high)."""
    monkeypatch.setattr(throughput, "time", _OneSecondPerReading())
    args, data = _args(), _tiny_data()
    if pipeline == "A":
        m = throughput.measure_fast(throughput.Variant("A"), args, data, torch.device("cpu"), 32)
        trained = N_IMAGES
    else:
        m = throughput.measure_naive(throughput.Variant("B", naive=True), args, data, torch.device("cpu"), 32)
        trained = N_IMAGES - BATCH
    assert m.timed_images == trained
    assert m.train_ips == pytest.approx(trained)  # images over one clock second


@pytest.mark.slow
def test_throughput_benchmark_prints_both_pipelines_the_ratio_and_the_projection():
    out = subprocess.run(
        [sys.executable, "bench/throughput.py", "--device", "cpu", "--model", "BNMLP", "--batch-size", "8",
         "--steps", "1", "--warmup", "1", "--rounds", "1", "--eval-images", "16", "--workers", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "A: this project" in out.stdout and "B: naive" in out.stdout
    assert "ratio A / B: train" in out.stdout
    assert "320 epochs" in out.stdout and "1 timed steps after 1 warm-up" in out.stdout
