"""Runs pieces of the pipeline in one process or under torchrun, for tests/test_distributed.py.

    python tests/dist_worker.py STEPS CONFIG OUT [CONFIG OUT ...]          # per config: evaluate, then STEPS steps
    torchrun --nproc_per_node=2 tests/dist_worker.py ...                   # the same over two processes
    WB_FORCE_DISTRIBUTED=1 torchrun --nproc_per_node=1 tests/dist_worker.py ...  # one process, distributed code

Several configs run one after another in the same process group (one launch, one start-up).
Rank 0 saves what it saw to each OUT (torch.save of tensors only).  The code path is the
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
from utils.ddp import _GlobalBatchStats  # noqa: E402
from utils.evaluation import evaluate, extract_features  # noqa: E402
from utils.prepare import make_train_state, prepare  # noqa: E402
from utils.train import train_one_epoch  # noqa: E402


def run(config: str, steps: int, path: str) -> None:
    cfg = resolve("first", config, {})
    p = prepare(cfg, "first")
    train, val, test, augment = make_splits(p.data, p.device)
    out: dict = {"world_size": torch.tensor(ddp.context().world_size),
                 "global_batch_bn": torch.tensor(sum(isinstance(m, _GlobalBatchStats) for m in p.model.modules()))}
    # evaluation of the initial weights on the test split
    result = evaluate(p.model, test, augment, p.data.n_classes, p.eval_batch_size,
                      want_features=True, fast=p.fast, want_preds=True)
    feats = extract_features(p.model, test, augment, p.eval_batch_size, hflip=True, fast=p.fast)
    out["eval"] = dict(counts=result.counts, preds=result.preds, features=result.features.cpu(),
                       plain=feats.plain.cpu(), flipped=feats.flipped.cpu(), n=torch.tensor(len(test)))
    # training steps
    state = make_train_state(p, augment)
    out["ddp_forward"] = torch.tensor(state.forward is not None)
    out["initial"] = {k: v.detach().cpu().clone() for k, v in p.model.state_dict().items()}
    for group in state.optimizer.param_groups:
        group["lr"] = cfg.optim.base_lr
    trained = train_one_epoch(p.model, train, state, 1, 1, show_progress=False, max_steps=steps)
    out.update(step_loss=trained["step_loss"], correct=trained["correct"],
               weights={k: v.detach().cpu().clone() for k, v in p.model.state_dict().items()})
    if ddp.context().is_main:
        torch.save(out, path)


def main(argv: list[str]) -> None:
    steps, pairs = int(argv[0]), argv[1:]
    ddp.setup(resolve("first", pairs[0], {}).device)
    for config, path in zip(pairs[::2], pairs[1::2]):
        run(config, steps, path)
    ddp.teardown()


if __name__ == "__main__":
    main(sys.argv[1:])
