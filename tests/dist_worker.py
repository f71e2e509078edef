"""Runs pieces of the pipeline in one process or under torchrun, for tests/test_distributed.py.

    python tests/dist_worker.py PLAN.json                                    # one process
    torchrun --nproc_per_node=2 tests/dist_worker.py PLAN.json               # the same over two processes
    torchrun --nproc_per_node=1 tests/dist_worker.py PLAN.json               # one process (a launch of one is not
                                                                             # distributed), then see "force" below

PLAN.json is a list of jobs, run one after another in one process group (one launch, one
start-up, as first.py runs several seeds):

    {"steps": 6, "config": CONFIG, "out": OUT}
        evaluate the initial weights on the test split, then 6 training steps; rank 0 saves
        what it saw to OUT (torch.save of tensors only).  The code path is the library's own:
        ``prepare``, ``make_splits``, ``make_train_state``, ``train_one_epoch``, ``evaluate``,
        ``extract_features``.
    {"cli": "first" | "second", "argv": [...], "out": OUT}
        first.py's / second.py's ``main``; every rank writes its exit status and what it
        printed to OUT.rank<r>.json ({"rc", "stdout", "stderr"}).
    {"force": true}
        from here on WB_FORCE_DISTRIBUTED=1: a launch of one process joins a process group and
        runs the distributed code (DDP, global-batch BatchNorm, gathers, sharded evaluation).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from utils import cli  # noqa: E402
from utils import distributed as ddp  # noqa: E402
from utils.data.batches import make_splits  # noqa: E402
from utils.config import resolve  # noqa: E402
from utils.engine.ddp import _GlobalBatchStats  # noqa: E402
from utils.engine.evaluation import evaluate, extract_features  # noqa: E402
from utils.run.prepare import make_train_state, prepare  # noqa: E402
from utils.engine.train import train_one_epoch  # noqa: E402


def run_steps(config: str, steps: int, path: str) -> None:
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


def run_cli(stage: str, argv: list[str], path: str) -> None:
    """``main`` as first.py runs it, in this launch's process group (kept for the next job)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    real_teardown = ddp.teardown
    ddp.teardown = lambda: None
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            rc = cli.main(stage, argv)
    finally:
        ddp.teardown = real_teardown
    rank = ddp.context().rank
    Path(f"{path}.rank{rank}.json").write_text(json.dumps({"rc": rc, "stdout": stdout.getvalue(),
                                                           "stderr": stderr.getvalue()}))


def main(plan_path: str) -> None:
    plan = json.loads(Path(plan_path).read_text())
    ddp.setup("auto")  # torchrun (or WB_FORCE_DISTRIBUTED=1): one process group for every job
    for job in plan:
        if job.get("force"):
            os.environ[ddp.FORCE_ENV] = "1"
            ddp.setup("auto")
        elif "steps" in job:
            run_steps(job["config"], int(job["steps"]), job["out"])
        else:
            run_cli(job["cli"], job["argv"], job["out"])
    ddp.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
