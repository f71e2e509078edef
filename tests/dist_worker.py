"""Runs pieces of the pipeline in one process or under torchrun, for tests/test_distributed.py.

    python tests/dist_worker.py train CONFIG STEPS OUT     # STEPS training steps of stage 1
    python tests/dist_worker.py eval CONFIG OUT            # evaluate + extract_features on the test split
    torchrun --nproc_per_node=2 tests/dist_worker.py ...   # the same over two processes

Rank 0 saves what it saw to OUT (torch.save of tensors only).  The code path is the
library's own: ``prepare``, ``make_splits``, ``make_train_state``, ``train_one_epoch``,
``evaluate``, ``extract_features``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from utils import distributed as ddp  # noqa: E402
from utils.batches import make_splits  # noqa: E402
from utils.config import resolve  # noqa: E402
from utils.evaluation import extract_features  # noqa: E402
from utils.pipeline import make_train_state, prepare  # noqa: E402
from utils.train import evaluate, train_one_epoch  # noqa: E402


def main(argv: list[str]) -> None:
    mode, config = argv[0], argv[1]
    cfg = resolve("first", config, {})
    ddp.setup(cfg.device)
    p = prepare(cfg, "first")
    train, val, test, augment = make_splits(p.data, p.device)
    out: dict = {"world_size": torch.tensor(ddp.context().world_size)}
    if mode == "train":
        steps, path = int(argv[2]), argv[3]
        state = make_train_state(p, augment)
        out["initial"] = {k: v.detach().cpu().clone() for k, v in p.model.state_dict().items()}
        for group in state.optimizer.param_groups:
            group["lr"] = cfg.optim.base_lr
        result = train_one_epoch(p.model, train, state, 1, 1, show_progress=False, max_steps=steps)
        out.update(step_loss=result["step_loss"], correct=result["correct"],
                   train_loss=torch.tensor(result["record"]["train_loss"]),
                   weights={k: v.detach().cpu().clone() for k, v in p.model.state_dict().items()})
    elif mode == "eval":
        path = argv[2]
        result = evaluate(p.model, test, augment, p.data.n_classes, cfg.data.eval_batch_size,
                          want_features=True, fast=p.fast)
        feats = extract_features(p.model, test, augment, cfg.data.eval_batch_size, hflip=True, fast=p.fast)
        out.update(counts=result.counts, preds=result.preds, features=result.features.cpu(),
                   plain=feats.plain.cpu(), flipped=feats.flipped.cpu(), n=torch.tensor(len(test)))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    if ddp.context().is_main:
        torch.save(out, path)
    ddp.teardown()


if __name__ == "__main__":
    main(sys.argv[1:])
