"""Choices the CUDA path makes, checked on the CPU: the automatic evaluation batch by input
area, ``cuda:N`` as the current device, fresh compile caches per seed, and a CUDA-graph step
mark before every compiled DDP forward.  CUDA calls are replaced by recorders where a CPU
cannot make them; what they do on a GPU is the device check's (bench/)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import digits_config
from utils.engine.accel import resolve_eval_batch_size

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("side,batch", [(8, 1024), (32, 1024), (64, 1024), (65, 512), (96, 256), (128, 256),
                                        (224, 64), (256, 64), (512, 16)])
def test_auto_eval_batch_on_cuda_scales_with_input_area(side, batch):
    # the largest power of two <= 1024 * 64 * 64 / (H * W), at most 1024
    assert resolve_eval_batch_size(0, CUDA, (side, side)) == batch


def test_auto_eval_batch_on_cpu_tables_and_explicit_values():
    assert resolve_eval_batch_size(0, CPU, (224, 224)) == 64 and resolve_eval_batch_size(0, CPU, (32, 32)) == 64
    assert resolve_eval_batch_size(0, CUDA, None) == 1024  # a feature table (Helena)
    assert resolve_eval_batch_size(0, CUDA, (4000, 4000)) == 1  # never 0
    assert resolve_eval_batch_size(300, CUDA, (224, 224)) == 300  # a set value is kept


def test_input_size_comes_from_the_data():
    from utils.data.datasets import load_dataset

    digits = load_dataset("Digits", "datasets", "exp", 0.05, 10)
    assert digits.input_size == (8, 8)


def test_cuda_n_becomes_the_current_device(monkeypatch):
    from utils.run import prepare

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device(device)))
    assert prepare.use_device("cuda:1") == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    assert prepare.use_device("cuda") == CUDA and prepare.use_device("cpu") == CPU
    assert current == [torch.device("cuda", 1)]  # no index: the current device stays as it is


class _Prepared(Exception):
    """Raised in place of prepare(): run() got as far as preparing the model."""


@pytest.mark.parametrize("mode,resets", [("off", 0), ("default", 1), ("reduce-overhead", 1)])
def test_every_seed_compiles_afresh(monkeypatch, tmp_path, mode, resets):
    from utils.run import pipeline
    from utils.config import from_dict

    calls = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: calls.append("reset"))

    def prepare(cfg, stage, *options):
        calls.append("prepare")
        raise _Prepared

    monkeypatch.setattr(pipeline, "prepare", prepare)
    cfg = from_dict(digits_config("c", compile=mode))
    with pytest.raises(_Prepared):
        pipeline.run(cfg, "first", exp_root=tmp_path)
    assert calls == ["reset"] * resets + ["prepare"]  # before this seed's model is compiled


@pytest.mark.parametrize("mode,marks", [("reduce-overhead", 3), ("max-autotune", 3),
                                        ("max-autotune-no-cudagraphs", 0), ("default", 0)])
def test_compiled_ddp_forward_marks_a_cudagraph_step_before_every_step(monkeypatch, mode, marks):
    from models import build_model
    from utils.engine.accel import FastPath
    from utils.data.augment import BatchAugment
    from utils.engine.train import SplitTensors, TrainState, train_one_epoch

    steps = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(len(steps)))
    model = build_model("ResNet18", 3, in_channels=1, small_input=True)
    split = SplitTensors(torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8), torch.arange(20) % 3)

    def ddp_forward(x):  # stands for the compiled DistributedDataParallel module
        h = model.features(x)
        return h, model.classify(h)

    state = TrainState(optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                       objective=lambda logits, y, h: {"ce": F.cross_entropy(logits, y)},
                       augment=BatchAugment([0.5], [0.25], 0, False), batch_size=8, n_classes=3,
                       shuffle_generator=torch.Generator().manual_seed(0),
                       augment_generator=torch.Generator().manual_seed(1),
                       fast=FastPath(device_type="cuda", compile_mode=mode), forward=ddp_forward)
    train_one_epoch(model, split, state, 1, 1, show_progress=False)  # 20 = 8 + 8 + 4: three steps
    assert len(steps) == marks
