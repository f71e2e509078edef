"""Command lines of first.py and second.py (thin: parse, validate, run)."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Optional, Sequence

from utils.errors import RunInterrupted, TrainingDiverged, UserError
from utils.config import ConfigError, add_config_flags, overrides_from_flags, parse_bool, resolve

DESCRIPTIONS = {
    "first": "Stage 1: train a backbone on long-tailed data (weight decay, feature regularisation, "
             "ETF classifier). Reads a JSON config (--json_path); any flag given overrides its value.",
    "second": "Stage 2: load the stage-1 best weights and retrain the classifier (--retrain; class-balanced "
              "loss, weight decay, MaxNorm) or apply logit adjustment / classifier normalisation (0 epochs).",
}


def _bool_flag(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser(stage: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{stage}.py", description=DESCRIPTIONS[stage],
        usage="%(prog)s --json_path FILE [--seeds SEED ...] [--<section>_<key> VALUE ...]",
        epilog="Booleans take true/false/1/0. Lists take JSON ([true,false,true]) or comma-separated values. "
               "Outputs go to exp/<data.name>/<model.name>/<project_name>/<exp_name>/<seed>/.")
    parser.add_argument("--json_path", default="", help="JSON config in the original's layout")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="random seed(s); several seeds run one after another (default: the JSON's, else 0)")
    parser.add_argument("--exp_root", default="exp", help="root folder of the run directories (default: exp)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an unfinished run from its checkpoint.ckpt (last completed epoch); "
                             "a finished run is left as it is (same as --load_checkpoint true)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing run directory and start again (without --resume or "
                             "--overwrite an existing run is never touched)")
    if stage == "second":
        parser.add_argument("--retrain", nargs="?", const=True, default=False, type=_bool_flag, metavar="BOOL",
                            help="retrain the classifier (needs optim.total_epoch_num > 0); "
                                 "without it stage 2 only evaluates (total_epoch_num must be 0)")
    add_config_flags(parser)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"


def _rank() -> int:
    text = os.environ.get("RANK", "0").strip()  # torchrun's; set before the process group exists
    return int(text) if text.isdigit() else 0


def _report(message: str, same_on_every_rank: bool = True) -> None:
    """Print a final message once: on rank 0, and on the other ranks of a torchrun launch
    only when it may be their own (not a config error, which every rank shares)."""
    rank = _rank()
    if rank == 0:
        print(message, file=sys.stderr, flush=True)
    elif not same_on_every_rank:
        print(f"[rank {rank}] {message}", file=sys.stderr, flush=True)


def main(stage: str, argv: Optional[Sequence[str]] = None) -> int:
    from utils import distributed as ddp
    try:
        return _main(stage, argv)
    finally:
        ddp.teardown()


def _main(stage: str, argv: Optional[Sequence[str]] = None) -> int:
    warnings.formatwarning = _one_line_warning
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(stage).parse_args(argv)
    try:
        overrides = overrides_from_flags(args)
        base = resolve(stage, args.json_path or None, overrides)
        seeds = args.seeds if args.seeds is not None else [base.seeds]
        configs = [resolve(stage, args.json_path or None, {**overrides, "seeds": s}) for s in seeds]
        if stage == "second":
            epochs = base.optim.total_epoch_num
            if args.retrain and epochs <= 0:
                raise ConfigError("--retrain asks for retraining, but optim.total_epoch_num = 0; "
                                  "set it > 0 or drop --retrain to only evaluate")
            if not args.retrain and epochs > 0:
                raise ConfigError(f"optim.total_epoch_num = {epochs} but --retrain was not given; add --retrain "
                                  "to retrain the classifier, or set optim.total_epoch_num to 0 to only evaluate")
            if not base.model.is_pretrained:
                raise ConfigError("model.is_pretrained = false; stage 2 starts from a stage-1 run "
                                  "(set it to true and point model.pretrained_path at the run)")
        from utils import distributed as ddp
        dist = ddp.setup(base.device)  # torchrun: one process group for every seed
        if dist.enabled:
            for cfg in configs:
                ddp.check_global_batch(cfg)
        from utils.checkpoint import plan_run
        resume = args.resume or base.load_checkpoint
        for cfg in configs:  # every seed's directory is checked before any work starts
            plan_run(cfg, stage, args.exp_root, resume, args.overwrite, check_only=True)
        from utils.pipeline import run
        for cfg in configs:
            run(cfg, stage, exp_root=args.exp_root, resume=resume, overwrite=args.overwrite)
    except UserError as exc:
        _report(f"error: {exc}", same_on_every_rank=isinstance(exc, ConfigError))
        return 2
    except (TrainingDiverged, FloatingPointError) as exc:
        _report(f"error: {getattr(exc, 'diverged', exc)}")
        return 3
    except RunInterrupted as exc:
        from utils.checkpoint import resume_command
        _report(f"{exc}. Resume with: {resume_command(stage, argv)}")
        return 130
    except KeyboardInterrupt:
        from utils.checkpoint import resume_command
        _report(f"interrupted; the checkpoint of the last completed epoch is kept. Resume with: "
                f"{resume_command(stage, argv)}")
        return 130
    return 0
