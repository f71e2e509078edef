"""The fast path (utils/engine/accel.py, utils/engine/train.py) computes what plain fp32 eager PyTorch computes.

Tolerances:
* fp32 with channels_last and another SGD implementation only reorders
  floating-point sums (conv reductions of up to 4,608 terms, fp32 epsilon
  1.2e-7): the first loss agrees to 1e-7 relative (we allow 1e-6) and, after
  three SGD steps have carried the differences into the weights, the fourth to
  2e-5 with one thread and 1.7e-4 with two (measured: the threads split the
  sums differently); we allow 5e-4 relative after the first step.
* bf16 autocast rounds conv/linear inputs and weights to 8 significant bits
  (unit roundoff 2^-9 = 0.2%).  Through the ~20 conv+BN layers of a ResNet18,
  with BN renormalising after every conv, the logits and features carry
  relative errors of a few tenths of a percent; on losses near 4.8 (CE ~2.3
  plus the feature penalty of random features) the measured per-step
  difference was 0.011.  We allow 0.05 absolute (1% of the loss).  A real
  defect moves the loss by far more than that: a 10x learning rate moves the
  second step by 4 (asserted below, so the tolerance is shown to discriminate).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from utils.engine import accel
from utils.engine.accel import FastPath, make_fast_path, resolve_threads, sgd_kwargs
from utils.data.augment import BatchAugment
from utils.config import Config, ConfigError, OptimConfig, from_dict
from utils.engine.metrics import confusion_counts
from utils.data.batches import SplitTensors
from utils.engine.evaluation import evaluate
from utils.engine.train import TrainState, accumulate_confusion, train_one_epoch

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
K, N, BS, SIZE = 10, 64, 16, 16


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (N, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, K, (N,), generator=g)
    return SplitTensors(images, labels)


def _model():
    return build_model("ResNet18", K, generator=torch.Generator().manual_seed(1))


def _objective(record):
    def objective(logits, labels, features):
        terms = {"ce": F.cross_entropy(logits, labels), "feature_reg": 0.01 * 0.5 * features.float().pow(2).sum(1).mean()}
        record.append(float(sum(terms.values()).detach()))
        return terms
    return objective


def _fast_losses(fast_kwargs, sgd_impl, lr=0.01):
    torch.manual_seed(0)
    model = _model()
    fast = make_fast_path(model, torch.device("cpu"), **fast_kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, **sgd_kwargs(sgd_impl, torch.device("cpu")))
    losses = []
    state = TrainState(optimizer=opt, objective=_objective(losses), augment=BatchAugment(MEAN, STD, 2, True),
                       batch_size=BS, n_classes=K, shuffle_generator=torch.Generator().manual_seed(3),
                       augment_generator=torch.Generator().manual_seed(4), fast=fast)
    out = train_one_epoch(model, _data(), state, 1, 1, show_progress=False)
    return losses, out["record"]


def _reference_losses():
    """Plain fp32 eager training written out: no FastPath, no train_one_epoch."""
    torch.manual_seed(0)
    model = _model()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=False)
    data, augment = _data(), BatchAugment(MEAN, STD, 2, True)
    order = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    aug_gen = torch.Generator().manual_seed(4)
    losses = []
    for idx in order.split(BS):
        x = augment(data.images[idx], aug_gen)
        h = model.features(x)
        loss = F.cross_entropy(model.classify(h), data.labels[idx]) + 0.01 * 0.5 * h.pow(2).sum(1).mean()
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


@pytest.fixture(scope="module")
def reference():
    return _reference_losses()


def test_fp32_fast_path_matches_eager(reference):
    losses, record = _fast_losses({"precision": "fp32", "memory_format": "channels_last"}, "fused")
    assert len(losses) == len(reference) == N // BS
    assert losses[0] == pytest.approx(reference[0], rel=1e-6)
    assert losses == pytest.approx(reference, rel=5e-4)
    # the epoch record is the batch-size-weighted mean of the same losses
    assert record["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)


def test_default_cpu_path_is_bit_identical_to_eager(reference):
    losses, _ = _fast_losses({"precision": "auto", "memory_format": "auto"}, "auto")
    assert losses == reference


def test_bf16_fast_path_close_to_eager(reference):
    losses, _ = _fast_losses({"precision": "bf16", "memory_format": "channels_last"}, "foreach")
    diffs = [abs(a - b) for a, b in zip(losses, reference)]
    assert max(diffs) < 0.05, diffs
    assert losses != reference  # autocast really ran in bf16
    # a real defect is visible at this tolerance: a 10x learning rate moves later losses by more
    wrong, _ = _fast_losses({"precision": "bf16", "memory_format": "channels_last"}, "foreach", lr=0.1)
    assert max(abs(a - b) for a, b in zip(wrong, reference)) > 0.05


def test_channels_last_same_output():
    model = _model().eval()
    x = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expect = model(x)
        fast = make_fast_path(model, torch.device("cpu"), "fp32", "channels_last")
        assert model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        h, logits = fast.forward(model, x)
    assert torch.allclose(logits, expect, rtol=1e-4, atol=1e-5)
    assert torch.allclose(model.classify(h), logits)


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_sgd_implementations_same_update(impl):
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(5, 7, generator=g), torch.randn(3, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in init] for _ in range(3)]

    def run(kind):
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, **sgd_kwargs(kind, torch.device("cpu")))
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.clone()
            opt.step()
        return params

    for a, b in zip(run("for-loop"), run(impl)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(run("for-loop")[0], init[0])


def test_sgd_kwargs_and_auto_choices():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert sgd_kwargs("auto", cpu) == {}
    assert sgd_kwargs("auto", cuda) == {"fused": True}
    assert sgd_kwargs("foreach", cpu) == {"foreach": True}
    assert sgd_kwargs("for-loop", cuda) == {"foreach": False}
    with pytest.raises(ValueError):
        sgd_kwargs("fast", cpu)
    assert accel.resolve_precision("auto", cpu) is None
    assert accel.resolve_precision("bf16", cpu) is torch.bfloat16
    assert accel.resolve_precision("fp32-strict", cpu) is None
    assert accel.resolve_channels_last("auto", cpu) is False
    assert accel.resolve_channels_last("contiguous", cpu) is False
    assert accel.resolve_channels_last("channels_last", cpu) is True


def _gpu(monkeypatch, name, capability):
    """Pretend that cuda:0 is this GPU (the resolution reads only its name and capability)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return torch.device("cuda", 0)


@pytest.mark.parametrize("name, capability, fast", [
    ("NVIDIA H200", (9, 0), True), ("NVIDIA A100-SXM4-80GB", (8, 0), True), ("NVIDIA GeForce RTX 3090", (8, 6), True),
    ("Tesla V100-SXM2-16GB", (7, 0), False), ("Tesla T4", (7, 5), False), ("NVIDIA GeForce RTX 2080 Ti", (7, 5), False),
])
def test_auto_precision_and_layout_need_compute_capability_8(monkeypatch, name, capability, fast):
    """bf16 and channels_last only where bf16 tensor cores exist (is_bf16_supported() also counts
    emulation, e.g. on a V100); the log line says what was chosen and why."""
    cuda = _gpu(monkeypatch, name, capability)
    major, minor = capability
    why = f"auto: {name}, compute {major}.{minor} {'>=' if fast else '<'} 8.0"
    assert accel.choose_precision("auto", cuda).text() == (f"bf16 ({why})" if fast else f"fp32 ({why})")
    assert accel.choose_memory_format("auto", cuda).text() == (f"channels_last ({why})" if fast else f"contiguous ({why})")
    assert accel.resolve_precision("auto", cuda) is (torch.bfloat16 if fast else None)
    assert accel.resolve_channels_last("auto", cuda) is fast
    # explicit choices are kept, with the caveat that applies
    assert accel.choose_precision("fp32-strict", cuda).text() == "fp32-strict"
    assert accel.choose_memory_format("contiguous", cuda).text() == "contiguous"
    fp32 = accel.choose_precision("fp32", cuda)
    assert fp32.value == "fp32" and (("TF32" in fp32.reason) is fast)
    bf16 = accel.choose_precision("bf16", cuda)
    assert bf16.value == "bf16" and (("no bf16 tensor cores" in bf16.reason) is not fast)


def test_train_log_line_and_tf32_flags(monkeypatch):
    cuda = _gpu(monkeypatch, "NVIDIA H200", (9, 0))
    fast = make_fast_path(_model(), cuda, "auto", "auto")
    assert (fast.amp_dtype, fast.channels_last, fast.precision) == (torch.bfloat16, True, "bf16")
    assert fast.describe() == ("precision bf16 (auto: NVIDIA H200, compute 9.0 >= 8.0), memory format "
                               "channels_last (auto: NVIDIA H200, compute 9.0 >= 8.0), compile off")
    cpu = torch.device("cpu")
    assert make_fast_path(_model(), cpu, "auto", "auto").describe() == \
        "precision fp32 (auto: CPU), memory format contiguous (auto: CPU), compile off"
    try:
        strict = make_fast_path(_model(), cuda, "fp32-strict", "auto")
        assert strict.amp_dtype is None and strict.precision == "fp32-strict"
        assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False
        make_fast_path(_model(), cuda, "fp32", "auto")  # torch's defaults again: TF32 convolutions, fp32 matmuls
        assert torch.backends.cudnn.allow_tf32 is True and torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        accel.set_tf32(True)
    with pytest.raises(ValueError, match="precision must be one of"):
        accel.choose_precision("fp16", cpu)


def test_classifier_runs_in_fp32_outside_bf16_autocast():
    """Validation accuracy (model selection) and the tau sweep read these logits: no bf16 rounding
    of the classifier, in eager and compiled forwards and under DDP (the same function)."""
    model = _model().eval()
    fast = make_fast_path(model, torch.device("cpu"), "bf16", "contiguous")
    x = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with fast.autocast():
            h, logits = fast.forward(model, x)
            rounded = model.classify(h)  # what autocast alone would give
        assert h.dtype == torch.bfloat16 and logits.dtype == torch.float32
        assert torch.equal(logits, model.classify(h.float()))
        assert rounded.dtype == torch.bfloat16 and not torch.equal(rounded.float(), logits)
        # without autocast the function is the plain forward, bit for bit
        h32, logits32 = accel.features_and_logits(model, x)
        assert torch.equal(logits32, model(x)) and torch.equal(h32, model.features(x))


def test_resolve_threads(monkeypatch):
    assert resolve_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resolve_threads(0) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(accel, "others_running", lambda: 0)
    assert resolve_threads(0) == accel.available_cores() >= 1


@pytest.mark.parametrize("cores, processes, busy, threads", [
    (2, None, 0, 2), (2, None, 1, 1), (2, None, 5, 1), (16, None, 3, 13), (16, "4", 0, 4), (16, "4", 14, 2),
    (2, "3", 0, 1)])
def test_auto_threads_leave_busy_cores_and_share_among_local_processes(monkeypatch, cores, processes, busy, threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    monkeypatch.setattr(accel, "available_cores", lambda: cores)
    monkeypatch.setattr(accel, "others_running", lambda: busy)
    choice = accel.choose_threads(0)
    assert int(choice.value) == threads
    assert f"{cores} cores" in choice.reason and (f"{busy} threads of other work" in choice.reason) == (busy > 0)


def test_others_running_reads_the_kernels_runnable_count(monkeypatch, tmp_path):
    import builtins
    readings = iter(["procs_running 3\n", "procs_running 1\n", "procs_running 4\n", "procs_running 3\n",
                     "procs_running 2\n"])
    real_open = builtins.open

    def fake_open(path, *a, **k):
        if path == "/proc/stat":
            f = tmp_path / "stat"
            f.write_text("cpu  1 2 3\n" + next(readings))
            return real_open(f, *a, **k)
        return real_open(path, *a, **k)
    monkeypatch.setattr(builtins, "open", fake_open)
    assert accel.others_running(interval_s=0) == 2  # the median of 2, 0, 3, 2, 1 (the reader is not other work)


def test_config_keys_match_accel_choices():
    fields = {f.name: f for f in dataclasses.fields(Config)}
    assert fields["precision"].metadata["choices"] == accel.PRECISIONS
    assert fields["memory_format"].metadata["choices"] == accel.MEMORY_FORMATS
    assert fields["compile"].metadata["choices"] == accel.COMPILE_MODES
    sgd = {f.name: f for f in dataclasses.fields(OptimConfig)}["sgd_impl"]
    assert sgd.metadata["choices"] == accel.SGD_IMPLS
    cfg = Config()
    assert (cfg.precision, cfg.memory_format, cfg.compile, cfg.num_threads, cfg.optim.sgd_impl) == \
        ("auto", "auto", "off", 0, "auto")
    with pytest.raises(ConfigError, match="precision = 'fp16' is not allowed; choose one of: auto, fp32, fp32-strict, bf16"):
        from_dict({"precision": "fp16"})
    with pytest.raises(ConfigError, match="num_threads = -1 must be >= 0"):
        from_dict({"num_threads": -1})


def test_accumulate_confusion_matches_bincount():
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 4, dtype=torch.long)
    total = torch.zeros(4, 4, dtype=torch.long)
    for _ in range(3):
        pred, lab = torch.randint(0, 4, (50,), generator=g), torch.randint(0, 4, (50,), generator=g)
        accumulate_confusion(counts, pred, lab)
        total += confusion_counts(pred, lab, 4)
    assert torch.equal(counts, total) and int(counts.sum()) == 150
    one = torch.zeros(3, 3, dtype=torch.long)
    accumulate_confusion(one, torch.tensor([2, 2]), torch.tensor([0, 1]))  # rows = true class
    assert one.tolist() == [[0, 0, 1], [0, 0, 1], [0, 0, 0]]


def test_max_steps_and_record():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = []
    state = TrainState(optimizer=opt, objective=_objective(losses), augment=BatchAugment(MEAN, STD, 2, True),
                       batch_size=BS, n_classes=K, shuffle_generator=torch.Generator().manual_seed(3),
                       augment_generator=None)
    out = train_one_epoch(model, _data(), state, 1, 1, show_progress=False, max_steps=2)
    assert len(losses) == 2
    assert out["record"]["train_loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert int(out["correct"].shape[0]) == N
    assert out["images"] == 2 * BS and "images" not in out["record"]  # trained images (not a metrics.csv column)
    data = _data()
    for n, trained in ((63, 63), (49, 48)):  # a short last batch counts; a last batch of one is dropped
        split = SplitTensors(data.images[:n], data.labels[:n])
        assert train_one_epoch(model, split, state, 1, 1, show_progress=False)["images"] == trained


def test_evaluate_fast_path_features():
    model = _model()
    data = _data()
    aug = BatchAugment(MEAN, STD, 2, True)
    plain = evaluate(model, data, aug, K, 24, want_features=True)
    on_device = evaluate(model, data, aug, K, 24, want_features=True, features_on_device=True,
                         fast=FastPath(channels_last=True))
    assert on_device.features.dtype == torch.float32 and on_device.features.shape == plain.features.shape
    assert torch.allclose(on_device.features, plain.features, rtol=1e-4, atol=1e-5)
    assert torch.equal(on_device.counts, plain.counts) and int(plain.counts.sum()) == N
    bf16 = evaluate(model, data, aug, K, 24, want_features=True, fast=FastPath(amp_dtype=torch.bfloat16))
    assert bf16.features.dtype == torch.float32  # features leave autocast as fp32 for the statistics
    assert int(bf16.counts.sum()) == N


def test_stage1_run_with_bf16_channels_last_foreach(tmp_path, monkeypatch, write_json, capsys):
    """The keys reach the run: logged, written to args.json, and the run trains and evaluates."""
    import json

    import numpy as np

    from tests.conftest import digits_config
    from utils.cli import main
    monkeypatch.chdir(tmp_path)
    path = write_json("fast.json", digits_config("fast", epochs=1, model={"name": "ResNet32"},  # a small conv net
                                                 optim={"sgd_impl": "foreach"}, precision="bf16",
                                                 memory_format="channels_last", num_threads=1))
    assert main("first", ["--json_path", path, "--seeds", "0"]) == 0
    out = capsys.readouterr().out
    assert "precision bf16, memory format channels_last, compile off, 1 CPU threads (num_threads)" in out
    run = tmp_path / "exp/Digits/ResNet32/first/fast/0"
    args = json.loads((run / "args.json").read_text())
    assert (args["precision"], args["memory_format"], args["optim"]["sgd_impl"]) == ("bf16", "channels_last", "foreach")
    assert np.isfinite(json.loads((run / "fdr.json").read_text())["train"])
    assert torch.get_num_threads() == 1


def test_eval_batch_size_auto_and_the_cpu_allocator_setting():
    from utils.engine.accel import keep_freed_memory, resolve_eval_batch_size
    assert resolve_eval_batch_size(0, torch.device("cpu")) == 64
    assert resolve_eval_batch_size(0, torch.device("cuda")) == 1024
    assert resolve_eval_batch_size(300, torch.device("cpu")) == 300
    assert keep_freed_memory() is True  # glibc on Linux, where the tests run
