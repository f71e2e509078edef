"""No training step waits for the device (utils/engine/host_syncs.py).

On the CPU the check is structural: every aten operator that would read device data back on
CUDA (.item()/int()/bool(), nonzero, boolean-mask indexing, bincount, ...) is recorded over a
few real training steps (augmentation, forward, loss terms, backward, optimizer step, the
epoch's accumulation), for configurations that cover the loss kinds, the explicit classifier
row decay, MaxNorm per step and both non-finite modes.  With CUDA, the same steps run under
torch.cuda.set_sync_debug_mode.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import digits_config
from utils.data.batches import make_splits
from utils.engine.guard import NonFiniteGuard
from utils.config import from_dict
from utils.engine.host_syncs import HostReads, syncs_in_steps
from utils.run.prepare import make_train_state, prepare

CONFIGS = {
    # jsons/*/first.json's objective: CE + WD (coupled) + FR + ETF; nonfinite stop as on CUDA (flag read every 25)
    "stage1-default": ({"weight_decay": 5e-3, "features_regularization": 1e-2}, {"use_etf": True}, {}, "stop"),
    # NC feature terms, decayed classifier rows kept explicit, skip through fused SGD's found_inf
    "nc-rows-skip-fused": ({"loss_type": "NC", "nc_lambda1": 0.1, "nc_lambda2": 0.1, "weight_decay": 5e-3,
                            "weight_decay_target": [True, False, True], "sgd_impl": "fused"}, {}, {}, "skip"),
    # sigmoid focal (one_hot), MaxNorm after every step, bf16 autocast, channels_last, foreach SGD
    "focal-maxnorm-bf16": ({"loss_type": "CB", "cb_type": "focal", "norm_type": "maxnorm", "maxnorm_every": "step",
                            "weight_decay": 5e-3, "sgd_impl": "foreach"}, {},
                           {"precision": "bf16", "memory_format": "channels_last"}, "stop"),
}


def _steps(name, device="cpu", mode=None):
    optim, model, top, nonfinite = CONFIGS[name]
    cfg = from_dict(digits_config("syncs", optim={**optim, "nonfinite": nonfinite}, model=model,
                                  device=device, num_threads=1, **top))
    p = prepare(cfg, "first")
    train, _, _, augment = make_splits(p.data, p.device)
    guard = NonFiniteGuard(nonfinite, p.device)
    guard.sync_every = 25  # the CUDA setting, also on the CPU
    state = make_train_state(p, augment, guard)
    return syncs_in_steps(p.model, train, state, steps=2, warmup=1, mode=mode)


@pytest.mark.parametrize("name", CONFIGS)
def test_training_steps_read_nothing_back_from_the_device(name):
    found = _steps(name)
    assert found == [], "\n".join(f"{op} at {where}" for op, where in found)


def test_a_reintroduced_read_back_is_found(monkeypatch):
    """The check can fail: the NC loss as first written (int(labels.max()), bincount, masks)."""
    import math

    import utils.engine.objective

    def nc_terms_with_masks(labels, features, n_classes):
        h = features.float()
        k = int(labels.max()) + 1
        counts = torch.bincount(labels, minlength=k).to(h.dtype)
        means = torch.zeros(k, h.shape[1]).index_add(0, labels, h) / counts.clamp_min(1).unsqueeze(1)
        within = ((h - means[labels]).pow(2).sum(dim=1) / counts[labels]).sum()
        present = (counts > 0) & (means.norm(dim=1) > 0)
        unit = means[present] / means[present].norm(dim=1, keepdim=True)
        angles = torch.arccos((unit @ unit.t() - 0.01).clamp(min=-1.0 + 1e-6))
        return within, angles.masked_fill(torch.eye(len(unit), dtype=torch.bool), math.inf).min(dim=1).values.mean()

    monkeypatch.setattr(utils.engine.objective, "nc_terms", nc_terms_with_masks)
    ops = {op for op, _ in _steps("nc-rows-skip-fused")}
    assert {"_local_scalar_dense", "bincount", "index"} <= ops


def test_host_reads_recognises_each_kind():
    t = torch.tensor([1, 2, 3])
    with HostReads() as reads:
        int(t.max())
        _ = t[t > 1]
        torch.bincount(t)
        t.nonzero()
        bool(t.sum() > 2)
        t.repeat_interleave(t)
        # none of these reads anything back
        _ = t[torch.tensor([0, 2])]
        torch.where(t > 1, t, 0)
        t.index_select(0, torch.tensor([1]))
        t.repeat_interleave(2)
    ops = [op for op, _ in reads.found]
    assert ops == ["_local_scalar_dense", "index", "bincount", "nonzero", "_local_scalar_dense", "repeat_interleave"]
    assert all("tests/test_host_syncs.py" in where for _, where in reads.found)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", CONFIGS)
def test_cuda_training_steps_never_synchronise(name):
    assert _steps(name, device="cuda", mode="error") == []
