"""Command lines of first.py and second.py: parse -> run every seed -> draw its figures.

Every problem with what the user gave (flags, config, environment, files) ends here as one
line on stderr, ``error: ...``, and exit code 2; see README "Usage" for the exit codes.
Nothing imports this module.  At import it loads no torch (the parser is built from the
config dataclasses), so ``--help`` and a bad flag answer at once; the run machinery is
loaded once the command line has been checked.
"""
from __future__ import annotations

import argparse
import difflib
import errno
import io
import os
import shlex
import sys
import warnings
from typing import Optional, Sequence

from utils.run import runlog
from utils.config import (ConfigError, add_config_flags, has_control_character, overrides_from_flags, parse_bool,
                          resolve, unencodable)
from utils.errors import RunDirError, RunInterrupted, TrainingDiverged, UserError

DESCRIPTIONS = {
    "first": "Stage 1: train a backbone on long-tailed data (weight decay, feature regularisation, "
             "ETF classifier). Reads a JSON config (--json_path); any flag given overrides its value.",
    "second": "Stage 2: load the stage-1 best weights and retrain the classifier (--retrain; class-balanced "
              "loss, weight decay, MaxNorm) or apply logit adjustment / classifier normalisation (0 epochs).",
}

# Exit codes (README "Usage").
EXIT_OK, EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_INTERRUPTED = 0, 2, 3, 130


def _bool_flag(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _OneLineParser(argparse.ArgumentParser):
    """argparse's errors (a bad --seeds value, an unknown flag) as one ConfigError line instead
    of usage text and ``sys.exit(2)``."""

    def error(self, message: str):  # type: ignore[override]
        message = one_line(message)
        if message.startswith("unrecognized arguments:"):
            unknown = message.split(":", 1)[1].split()
            flag = next((u for u in unknown if u.startswith("-")), None)
            if flag is not None:
                options = [o for action in self._actions for o in action.option_strings]
                close = difflib.get_close_matches(flag.split("=")[0], options, n=1)
                if close:
                    message += f"; did you mean {close[0]}?"
        raise ConfigError(f"{message} (see {self.prog} --help)")


def build_parser(stage: str) -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=f"{stage}.py", description=DESCRIPTIONS[stage],
        usage="%(prog)s --json_path FILE [--seeds SEED ...] [--<section>_<key> VALUE ...]",
        epilog="Booleans take true/false/1/0. Lists take JSON ([true,false,true]) or comma-separated values. "
               "Outputs go to exp/<data.name>/<model.name>/<project_name>/<exp_name>/<seed>/. "
               "Exit codes: 0 done, 2 bad input, 3 the loss became NaN/inf, 130 interrupted.")
    parser.add_argument("--json_path", default="", help="JSON config in the original's layout")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="random seed(s); several seeds run one after another (default: the JSON's, else 0)")
    parser.add_argument("--exp_root", default="exp", help="root folder of the run directories (default: exp)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an unfinished run from its checkpoint.ckpt (last completed epoch); "
                             "a finished run is left as it is (same as --load_checkpoint true)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run directory and start again (the old one is moved aside and "
                             "deleted once the new run has started; without --resume or --overwrite an existing "
                             "run is never touched)")
    parser.add_argument("--no_figures", action="store_true",
                        help="do not draw the figures (imgs/*.png and TensorBoard images) after the run; "
                             "python -m utils.plots redraw RUN_DIR draws them later")
    if stage == "second":
        parser.add_argument("--retrain", nargs="?", const=True, default=False, type=_bool_flag, metavar="BOOL",
                            help="retrain the classifier (needs optim.total_epoch_num > 0); "
                                 "without it stage 2 only evaluates (total_epoch_num must be 0)")
        parser.add_argument("--allow_unfinished_stage1", action="store_true",
                            help="use a stage-1 run that has not finished (its best weights so far); refused "
                                 "without this flag")
    add_config_flags(parser)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"


def one_line(text: str) -> str:
    """Text with its control characters (a newline in a file name or a flag value) escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _report(message: str, same_on_every_rank: bool = True) -> None:
    runlog.report(one_line(message), same_on_every_rank)


# ---------------------------------------------------------------------------
# The environment the code reads
# ---------------------------------------------------------------------------

MAX_THREADS = 4096


def check_environment(env=os.environ) -> None:
    """Environment variables the code reads, checked before any work: one line for a value
    that would end in a traceback or a hang later (torch, OpenMP, the process group)."""
    threads = env.get("OMP_NUM_THREADS", "").strip()
    if threads:
        # OpenMP also allows a list for nested levels ("4,2"); torch uses the first
        levels = threads.split(",")
        if not all(t.strip().isdecimal() and t.strip().isascii() and 1 <= int(t) <= MAX_THREADS for t in levels):
            raise ConfigError(f"environment variable OMP_NUM_THREADS = {threads!r} is not allowed; give a number of "
                              f"threads in [1, {MAX_THREADS}] or unset it")
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    given = {n: env[n].strip() for n in names if n in env}
    for name, text in given.items():
        if not (text.isdecimal() and text.isascii()):
            raise ConfigError(f"environment variable {name} = {text!r} is not a process count or index; torchrun sets "
                              "it (unset WORLD_SIZE, RANK, LOCAL_RANK to run one process)")
    world = int(given.get("WORLD_SIZE", "1"))
    if world < 1:
        raise ConfigError("environment variable WORLD_SIZE = 0; torchrun sets it to the number of processes "
                          "(unset it to run one process)")
    if world > 1:
        rank, local = int(given.get("RANK", "-1")), int(given.get("LOCAL_RANK", "-1"))
        local_world = int(given.get("LOCAL_WORLD_SIZE", str(world)))
        if not 0 <= rank < world or not 0 <= local < local_world:
            raise ConfigError(f"environment: WORLD_SIZE = {world} but RANK = {given.get('RANK')!r} and LOCAL_RANK = "
                              f"{given.get('LOCAL_RANK')!r} (LOCAL_WORLD_SIZE {local_world}); start several processes "
                              "with torchrun, or unset WORLD_SIZE to run one")
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not env.get(n, "").strip()]
        if missing:
            raise ConfigError(f"environment: WORLD_SIZE = {world} but {' and '.join(missing)} not set; start several "
                              "processes with torchrun (it sets them), or unset WORLD_SIZE to run one")


def _quiet_output_streams() -> None:
    """Text that the terminal's encoding cannot show (a run name in another script under an
    ASCII locale) is printed escaped rather than ending the run."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, io.UnsupportedOperation):  # pragma: no cover - a detached stream
                pass


def check_exp_root(exp_root: str) -> None:
    if not exp_root.strip():
        raise RunDirError(f"--exp_root {exp_root!r} is empty; give the folder for the run directories (default: exp)")
    bad = unencodable(exp_root)
    if bad is not None or has_control_character(exp_root):
        what = f"{bad}, a lone surrogate" if bad is not None else "a control character"
        raise RunDirError(f"--exp_root {exp_root!r} contains {what}; give a path in valid Unicode")


def check_device(name: str) -> None:
    """``cuda`` / ``cuda:N`` against the GPUs this process sees (before any work)."""
    if not name.startswith("cuda"):
        return
    import torch
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES = {visible!r})" if visible is not None else ""
    if not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r} but CUDA is not available on this machine{where}; use auto or cpu")
    count = torch.cuda.device_count()
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= count:
        raise ConfigError(f"device = {name!r} but {count} GPU(s) are visible{where}: use cuda:0 to cuda:{count - 1}, "
                          "cuda, auto or cpu")


def check_distinct_run_dirs(configs) -> None:
    """Two seeds of one command that would share a run directory (``--seeds 0 0``, or
    ``param_search``, whose folder is its id) are refused before any work."""
    seen: dict = {}
    for cfg in configs:
        sub = cfg.run_subdir()
        if sub in seen:
            why = (f"param_search names the folder by param_search_id = {cfg.param_search_id}, not by the seed"
                   if cfg.param_search else "the same seed twice")
            raise ConfigError(f"seeds {seen[sub]} and {cfg.seeds} would both write to {sub} ({why}); give each "
                              "run its own directory")
        seen[sub] = cfg.seeds


def configs_from_command_line(stage: str, argv: Sequence[str]):
    """(parsed flags, one validated Config per seed); any problem is a ConfigError or RunDirError."""
    args = build_parser(stage).parse_args(list(argv))
    check_exp_root(args.exp_root)
    overrides = overrides_from_flags(args)
    base = resolve(stage, args.json_path or None, overrides)
    seeds = args.seeds if args.seeds is not None else [base.seeds]
    configs = [resolve(stage, args.json_path or None, {**overrides, "seeds": s}) for s in seeds]
    check_distinct_run_dirs(configs)
    return args, configs


def check_stage_flags(stage: str, args, base) -> None:
    """second.py: --retrain and the epochs agree; the run starts from a stage-1 run."""
    if stage != "second":
        return
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


def check_global_batch(cfg, world_size: int) -> None:
    """Under torchrun ``data.batch_size`` is the global batch: it must split evenly over the processes."""
    batch = cfg.data.batch_size
    if cfg.optim.total_epoch_num > 0 and batch % world_size:
        lower, upper = batch - batch % world_size, batch + world_size - batch % world_size
        hint = f"{lower} or {upper}" if lower > 0 else f"{upper}"
        raise ConfigError(f"data.batch_size = {batch} is the global batch and must divide by the {world_size} "
                          "processes of this torchrun launch (nnodes x nproc_per_node); use "
                          f"{hint}, or another number of processes")


def resume_command(stage: str, argv) -> str:
    """The command that continues this one: the same flags with --resume (under torchrun, the
    same launch; multi-node: also --nnodes and the rendezvous of the first launch)."""
    from utils import distributed

    args = [a for a in argv if a not in ("--resume", "--overwrite")]
    c = distributed.context()
    if c.enabled:
        nodes = c.world_size // max(c.local_world_size, 1)
        launcher = ["torchrun"] + ([f"--nnodes={nodes}"] if nodes > 1 else []) + [f"--nproc_per_node={c.local_world_size}"]
        return shlex.join([*launcher, f"{stage}.py", *args, "--resume"])
    return shlex.join(["python", f"{stage}.py", *args, "--resume"])


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def main(stage: str, argv: Optional[Sequence[str]] = None) -> int:
    try:
        return _main(stage, argv)
    finally:
        # a process group exists only once the run machinery was loaded (never for --help)
        distributed = sys.modules.get("utils.distributed")
        if distributed is not None:
            distributed.teardown()


def _main(stage: str, argv: Optional[Sequence[str]] = None) -> int:
    warnings.formatwarning = _one_line_warning
    _quiet_output_streams()
    # figures are drawn on an Agg canvas; a display backend (or a misspelt one) must not stop a run
    os.environ["MPLBACKEND"] = "Agg"
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        check_environment()
        args, configs = configs_from_command_line(stage, argv)
        check_stage_flags(stage, args, configs[0])
        check_device(configs[0].device)
        run_seeds(stage, args, configs)
    except UserError as exc:
        _report(f"error: {exc}", same_on_every_rank=isinstance(exc, ConfigError))
        return EXIT_BAD_INPUT
    except (TrainingDiverged, FloatingPointError) as exc:
        _report(f"error: {exc}")
        return EXIT_DIVERGED
    except RunInterrupted as exc:
        _report(f"{exc}. Resume with: {resume_command(stage, argv)}")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _report(f"interrupted; the checkpoint of the last completed epoch is kept. Resume with: "
                f"{resume_command(stage, argv)}")
        return EXIT_INTERRUPTED
    except OSError as exc:
        # a file system that fills up or goes away outside the run's own writers (which say
        # more); never a traceback for the disk
        if exc.errno not in DISK_ERRNOS:
            raise
        _report(f"error: {exc.filename or 'a file'}: {exc.strerror or exc}; free space or fix the file system, "
                "then rerun (add --resume to continue a run)", same_on_every_rank=False)
        return EXIT_BAD_INPUT
    return EXIT_OK


def run_seeds(stage: str, args, configs) -> None:
    """Every seed's run directory is checked before any work starts (its lock by rank 0 only:
    rank 0 holds it for the launch); then each seed runs, and its figures are drawn."""
    from utils import distributed
    from utils.run.pipeline import run
    from utils.run.plan import plan_run

    base = configs[0]
    dist = distributed.setup(base.device)  # torchrun: one process group for every seed
    if dist.enabled:
        for cfg in configs:
            check_global_batch(cfg, dist.world_size)
    resume = args.resume or base.load_checkpoint
    plans = []

    def check_every_seed() -> None:
        for cfg in configs:
            plans.append(plan_run(cfg, stage, args.exp_root, resume, args.overwrite, check_only=True,
                                  locked=not runlog.speaks()))
    _on_every_rank(check_every_seed)
    allow_unfinished = getattr(args, "allow_unfinished_stage1", False)
    for cfg, plan in zip(configs, plans):
        path = run(cfg, stage, exp_root=args.exp_root, resume=resume, overwrite=args.overwrite,
                   allow_unfinished_stage1=allow_unfinished)
        if plan.action != "done" and runlog.speaks() and not args.no_figures:
            draw_figures(path)


def _on_every_rank(check) -> None:
    """Run a check; under torchrun a refusal on one rank stops every rank (none waits forever
    for a rank that has already left)."""
    from utils import distributed

    failure = None
    try:
        check()
    except UserError as exc:
        failure = exc
    if distributed.any_rank(failure is not None):
        raise failure if failure is not None else RunDirError("another process of this torchrun launch refused the "
                                                              "run; see its error")


def draw_figures(run_dir) -> None:
    """The figures of a finished run, drawn after it (training code never imports plotting).
    The run stands without them: a failure here is a warning, and ``python -m utils.plots
    redraw`` draws them again."""
    from utils.viz import plots
    try:
        plots.draw_figures(run_dir)
    except Exception as exc:  # noqa: BLE001 - the run is finished and kept; say so and go on
        text = " ".join(str(exc).split())[:200] or type(exc).__name__
        print(f"warning: the figures of {run_dir} could not be drawn ({type(exc).__name__}: {text}); "
              f"the run is finished; draw them with: python -m utils.plots redraw {run_dir}", file=sys.stderr,
              flush=True)


DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG, errno.ENOENT,
                         errno.ESTALE})
