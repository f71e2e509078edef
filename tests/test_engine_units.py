"""Unit tests of the run machinery in utils/run/checkpoint.py that a GPU run relies on: re-laid
optimizer state, skipping non-finite steps without host reads (fused SGD's found_inf), the
checkpoint schedule, the generator-state check, the cuDNN autotuner switch."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from utils.engine.accel import sgd_kwargs
from utils.run.checkpoint import AUTO_SAVE_RATIO, CheckpointSchedule, check_generator_states, relay_optimizer_state
from utils.run.determinism import apply_determinism
from utils.engine.guard import NonFiniteGuard
from utils.errors import CheckpointError
from utils.engine.host_syncs import HostReads

CPU = torch.device("cpu")
# the CUDA variants prove the GPU paths (fused CUDA SGD's found_inf and layouts) where a device exists
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _conv_weights(seed=0, channels_last=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, 3, 3, generator=g)
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    return [nn.Parameter(w.to(device)), nn.Parameter(torch.randn(4, generator=g).to(device))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["fused", "foreach", "for-loop"])
def test_relaid_momentum_gives_the_same_step_in_another_layout(impl, device):
    """A checkpoint from a contiguous run resumed with channels_last weights: after the relay the
    next step is bit-identical (SGD is elementwise); CPU fused SGD without it is silently wrong."""
    dev = torch.device(device)
    grads = [[torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i)).to(dev) for p in _conv_weights()]
             for i in range(2)]

    def step(params, opt, g):
        for p, gr in zip(params, g):
            p.grad = torch.empty_like(p).copy_(gr)  # autograd lays a gradient out like its weight
        opt.step()

    saved_params = _conv_weights(device=dev)
    saved_opt = torch.optim.SGD(saved_params, lr=0.1, momentum=0.9, **sgd_kwargs(impl, dev))
    step(saved_params, saved_opt, grads[0])
    checkpoint = {"params": [p.detach().clone() for p in saved_params],
                  "optimizer": copy.deepcopy(saved_opt.state_dict())}
    step(saved_params, saved_opt, grads[1])  # the uninterrupted run

    def resumed(relay: bool):
        params = _conv_weights(channels_last=True, device=dev)
        with torch.no_grad():
            for p, v in zip(params, checkpoint["params"]):
                p.copy_(v)
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, **sgd_kwargs(impl, dev))
        opt.load_state_dict(checkpoint["optimizer"])
        if relay:
            relay_optimizer_state(opt)
            buf = opt.state[params[0]]["momentum_buffer"]
            assert buf.stride() == params[0].stride() and not buf.is_contiguous()
        step(params, opt, grads[1])
        return params

    for a, b in zip(resumed(relay=True), saved_params):
        assert torch.equal(a.detach(), b.detach())
    if impl == "fused" and dev.type == "cpu":  # what the relay prevents (CUDA may refuse instead)
        assert not torch.equal(resumed(relay=False)[0].detach(), saved_params[0].detach())


def _guarded(impl, device=CPU):
    params = _conv_weights(1, device=device)
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, **sgd_kwargs(impl, device))
    guard = NonFiniteGuard("skip", device)
    # what train_step does with a guard: the loss terms through check_terms, the step through guard.step
    state = SimpleNamespace(optimizer=opt, objective=lambda loss: guard.check_terms({"ce": loss}),
                            step=lambda: guard.step(opt))
    return params, state, guard


def _step(params, state, loss_value, grad_value):
    state.objective(torch.tensor(loss_value, device=params[0].device))
    for p in params:
        p.grad = torch.full_like(p, grad_value)
    state.step()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_skip_of_the_first_step_leaves_zero_momentum_and_reads_nothing_back(monkeypatch, device):
    """found_inf = 1 makes fused SGD skip the step on the device.  Fused SGD would allocate its
    momentum buffers with torch.empty_like on that first step and leave them unset; the guard
    zeroes them first, so the next step is exactly a first step."""
    nan_memory = lambda t, *a, **k: torch.full_like(t, float("nan"))  # noqa: E731 - what empty_like may hold
    monkeypatch.setattr(torch, "empty_like", nan_memory)
    dev = torch.device(device)
    params, state, guard = _guarded("fused", dev)
    before = [p.detach().clone() for p in params]
    with HostReads() as reads:
        _step(params, state, float("nan"), float("nan"))
    assert reads.found == [], reads.found
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before)), "the step was applied"
    assert float(state.optimizer.found_inf) == 1.0
    _step(params, state, 1.0, 0.5)
    fresh = _conv_weights(1, device=dev)
    reference = torch.optim.SGD(fresh, lr=0.1, momentum=0.9, fused=True)
    for p in fresh:
        p.grad = torch.full_like(p, 0.5)
    monkeypatch.undo()
    reference.step()
    assert all(torch.equal(p.detach(), q.detach()) for p, q in zip(params, fresh))
    assert guard.end_epoch() == 1 and guard.skipped_total == 1


@pytest.mark.parametrize("impl", ["for-loop", "foreach"])
def test_unfused_skip_reads_the_flag_each_step(impl):
    params, state, guard = _guarded(impl)
    before = [p.detach().clone() for p in params]
    with HostReads() as reads:
        _step(params, state, 2.0, float("inf"))  # finite loss, infinite gradient
    assert [op for op, _ in reads.found] == ["_local_scalar_dense"]  # documented: one read per step
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert not hasattr(state.optimizer, "found_inf"), "unfused SGD refuses a found_inf"
    _step(params, state, 2.0, 0.5)
    assert not torch.equal(params[0].detach(), before[0])
    assert guard.end_epoch() == 1


def test_skip_check_uses_foreach_norms_not_get_total_norm(monkeypatch):
    """torch.nn.utils.get_total_norm exists from torch 2.6 only."""
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)
    params, state, guard = _guarded("fused")
    _step(params, state, 1.0, 0.25)
    _step(params, state, 1.0, float("nan"))
    assert guard.end_epoch() == 1


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _epochs(schedule, clock, n, train_s, save_s):
    """Train n epochs of train_s seconds; a due epoch saves for save_s.  Returns the saved epochs."""
    saved = []
    for epoch in range(1, n + 1):
        clock.t += train_s
        if schedule.due(epoch):
            started = clock()
            clock.t += save_s
            schedule.saved(started)
            saved.append(epoch)
    return saved


def test_auto_schedule_keeps_saving_under_5_percent_of_the_time():
    clock = FakeClock()
    # a long CPU epoch against its save: every epoch
    assert _epochs(CheckpointSchedule(0, 0.0, clock), clock, 5, 30.0, 1.0) == [1, 2, 3, 4, 5]
    # a Digits-LT ResNet18 epoch on 2 CPU cores: 0.8 s epochs, 0.26 s saves: every 7th epoch
    clock = FakeClock()
    assert _epochs(CheckpointSchedule(0, 0.0, clock), clock, 20, 0.8, 0.26) == [1, 8, 15]
    # an H200-like run: 0.5 s epochs, 2 s saves; the first epoch saves (and measures the save), then
    # every 80 epochs: 40 s of training per 2 s save, 4.8 % of the time
    clock = FakeClock()
    saved = _epochs(CheckpointSchedule(0, 0.0, clock), clock, 320, 0.5, 2.0)
    assert saved == [1, 81, 161, 241] and AUTO_SAVE_RATIO == 20
    assert 2.0 / (2.0 + 80 * 0.5) < 0.05
    # the schedule follows the measured save: a 10x slower save, 10x longer gaps
    clock = FakeClock()
    assert _epochs(CheckpointSchedule(0, 0.0, clock), clock, 1000, 0.5, 20.0) == [1, 801]


def test_schedule_every_n_epochs_and_every_s_seconds():
    clock = FakeClock()
    assert _epochs(CheckpointSchedule(3, 0.0, clock), clock, 10, 1.0, 5.0) == [3, 6, 9]
    clock = FakeClock()
    # every 10 s of wall time even where the 20x rule would wait (2 s saves: 40 s)
    assert _epochs(CheckpointSchedule(0, 10.0, clock), clock, 12, 3.0, 2.0) == [1, 5, 9]
    clock = FakeClock()
    # both: epochs 4 and 8, and a time bound that fires in between
    assert _epochs(CheckpointSchedule(4, 7.0, clock), clock, 8, 2.0, 0.5) == [4, 8]
    clock = FakeClock()
    assert _epochs(CheckpointSchedule(4, 5.0, clock), clock, 8, 2.0, 0.5) == [3, 4, 7, 8]


def test_generator_states_of_another_device_are_refused():
    cpu_state = torch.Generator().get_state()
    check_generator_states({"torch": cpu_state, "generators": {"shuffle": cpu_state, "augment": cpu_state}}, "ckpt")
    with pytest.raises(CheckpointError, match=r"its augment generator state \(16 bytes\) is not a CPU generator's"):
        check_generator_states({"torch": cpu_state, "generators": {"shuffle": cpu_state,
                                                                   "augment": torch.zeros(16, dtype=torch.uint8)}},
                               "ckpt")
    with pytest.raises(CheckpointError, match="its torch generator state"):
        check_generator_states({"torch": [1, 2], "generators": {}}, "ckpt")


def test_cudnn_benchmark_is_decided_by_determinism():
    try:
        apply_determinism(False)
        assert torch.backends.cudnn.benchmark is True and torch.backends.cudnn.deterministic is False
        apply_determinism(True)
        assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
    finally:
        apply_determinism(False)
