"""``python -m utils.sweep``: a hyper-parameter search on the validation set, on Optuna.

    python -m utils.sweep --json_path jsons/Digits/wb_first.json --study wb1 \\
        --space optim.weight_decay=log:1e-4:1e-1 --trials 12 --seeds 0 1

Every trial is an ordinary run per seed (utils/run/trials.py: this process, the project's own
run function, ``param_search`` on, no figures), scored by the mean class-averaged validation
accuracy; the study lives in a storage several workers can share (utils/run/study.py).  At
the end: the best trials as a table, ``<exp_root>/sweeps/<study>/best.json`` (a config
first.py / second.py run as is), ``trials.csv``, ``history.png`` and ``slices.png``.

Bad input (an unknown key, a spec outside a key's range, a malformed spec, a study made for
another search): one line ``error: ...``, exit 2, before any trial.  A trial that fails
(diverges, breaks a rule between keys, crashes) is recorded as failed and the sweep goes on.
Ctrl-C: the running trial's run finishes its epoch, the trial is queued again, the sweep
stops (exit 130); the same command continues the study.  Nothing imports this module.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from utils.config.load import read_json_file
from utils.config.values import has_control_character
from utils.errors import ConfigError, UserError

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 2, 130
SWEEPS_DIR = "sweeps"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m utils.sweep",
        description="Hyper-parameter search on the validation set (param_search runs; the test set is never "
                    "evaluated). Each trial runs the config with the trial's values once per seed; its score is "
                    "the mean class-averaged validation accuracy. Outputs in <exp_root>/sweeps/<study>/.",
        epilog="SPEC: log:LOW:HIGH, float:LOW:HIGH, int:LOW:HIGH, choice:A,B,... or grid:A,B,... "
               "Exit codes: 0 done, 2 bad input, 130 interrupted (re-run the same command to continue).")
    parser.add_argument("--json_path", required=True, help="the config to search around (stage 1 or stage 2)")
    parser.add_argument("--space", action="append", default=[], metavar="KEY=SPEC",
                        help="a searched key, e.g. optim.weight_decay=log:1e-4:1e-2 (repeat for several)")
    parser.add_argument("--sampler", default="tpe", choices=("tpe", "random", "grid"),
                        help="tpe (Bayesian, default), random, or grid (every combination of grid/choice values)")
    parser.add_argument("--trials", type=int, default=None, metavar="N",
                        help="trials in the study, over all workers (grid: default every combination)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                        help="seeds of every trial; its score is the mean over them (default: 0)")
    parser.add_argument("--study", default="", metavar="NAME",
                        help="study name: its folder exp/sweeps/NAME, its trials' runs NAME_t<number> "
                             "(default: the config's exp_name)")
    parser.add_argument("--storage", default="", metavar="URL",
                        help="an RDB URL (sqlite:///FILE, postgresql://..., mysql://...) shared by workers on several "
                             "machines; default: the journal file exp/sweeps/NAME/journal.log")
    stage1 = parser.add_mutually_exclusive_group()
    stage1.add_argument("--stage1_study", default="", metavar="NAME",
                        help="stage 2: start every trial from the best trial of this stage-1 sweep (same storage)")
    stage1.add_argument("--stage1", default="", metavar="RUN_DIR",
                        help="stage 2: the stage-1 run directory without the seed (sets model.pretrained_path)")
    parser.add_argument("--device", default="", help="device of every trial (cpu, cuda, cuda:N; default: the config's)")
    parser.add_argument("--exp_root", default="exp", help="root folder of the run directories (default: exp)")
    parser.add_argument("--sampler_seed", type=int, default=None,
                        help="seed of the tpe/random sampler (default: none; leave it out with several workers, "
                             "which would otherwise propose the same values)")
    parser.add_argument("--top", type=int, default=5, help="rows of the printed table of best trials (default: 5)")
    return parser


def _stage_of(json_path: str) -> str:
    raw = read_json_file(json_path, f"--json_path {json_path!r}")
    stage = raw.get("project_name", "first") if isinstance(raw, dict) else "first"
    if stage not in ("first", "second"):
        raise ConfigError(f"--json_path {json_path!r}: project_name = {stage!r}; a sweep runs first or second")
    return stage


def _check_arguments(args) -> None:
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1"):
        raise ConfigError("python -m utils.sweep runs one process per worker, not under torchrun; start one worker "
                          "per GPU instead (README \"Hyperparameter search\")")
    if args.trials is not None and args.trials < 1:
        raise ConfigError(f"--trials {args.trials}; give at least 1")
    if len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, args.seeds))} names a seed twice; give each once")
    if not args.exp_root.strip() or has_control_character(args.exp_root):
        raise ConfigError(f"--exp_root {args.exp_root!r} is not a folder name")
    if args.top < 1:
        raise ConfigError(f"--top {args.top}; give at least 1")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device!r} but CUDA is not available on this machine; use cpu")


def _stage1_path(args, stage: str, storage_for) -> str:
    """model.pretrained_path of every stage-2 trial: the best trial of a stage-1 sweep, a given run
    directory, or ('') the JSON's own."""
    if stage == "first" and (args.stage1_study or args.stage1):
        raise ConfigError("--stage1_study / --stage1 are for stage-2 sweeps; this config is stage 1")
    if args.stage1:
        return args.stage1
    if not args.stage1_study:
        return ""
    from utils.run.study import _optuna
    optuna = _optuna()
    name = args.stage1_study
    try:
        study = optuna.load_study(study_name=name, storage=storage_for(name))
        best = study.best_trial
    except (KeyError, ValueError):
        raise ConfigError(f"--stage1_study {name!r}: no such study with a finished trial in its storage; run the "
                          "stage-1 sweep first") from None
    run_dirs = best.user_attrs.get("run_dirs", [])
    seeds = set(best.user_attrs.get("seed_scores", {}))
    missing = [s for s in args.seeds if str(s) not in seeds]
    if not run_dirs or missing:
        raise ConfigError(f"--stage1_study {name!r}: its best trial {best.number} ran seeds {sorted(seeds)}, not "
                          f"{missing}; give --seeds among them")
    return str(Path(run_dirs[0]).parent)


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    args = build_parser().parse_args(argv)
    try:
        return _sweep(args)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _sweep(args) -> int:
    from utils.config.search_space import parse_space
    from utils.run import study as studies
    from utils.run.trials import run_trial, trial_configs

    _check_arguments(args)
    stage = _stage_of(args.json_path)
    params = parse_space(args.space, args.sampler)
    n_trials = studies.study_size(args.sampler, params, args.trials)
    sweeps = Path(args.exp_root) / SWEEPS_DIR

    def storage_for(name: str):
        return studies.make_storage(args.storage, sweeps / name)

    stage1 = _stage1_path(args, stage, storage_for)
    extra = {"device": args.device} if args.device else {}
    if stage1:
        extra["model.pretrained_path"] = stage1
    # the config, the study's name in run names and every seed, checked before any trial
    base = trial_configs(stage, args.json_path, {}, "check", args.seeds, extra)[0]
    name = args.study or base.exp_name
    try:  # the longest run name the study will give
        trial_configs(stage, args.json_path, {}, f"{name}_t{n_trials + 10_000}", args.seeds[:1], extra)
    except ConfigError as exc:
        raise ConfigError(f"--study {name!r} cannot name its runs: {exc}") from None
    sweep_dir = sweeps / name
    identity = {"config": str(args.json_path), "space": [p.spec() for p in params], "stage1": stage1,
                "sampler": args.sampler, "seeds": list(args.seeds)}
    study = studies.open_study(name, storage_for(name), studies.make_sampler(args.sampler, params, args.sampler_seed),
                               identity)
    if args.sampler == "grid":
        studies.enqueue_grid(study, params, sweep_dir)
    for number in studies.reclaim_abandoned(study, sweep_dir):
        print(f"trial {number} was left running by a worker of this machine that has ended; it is queued again",
              flush=True)
    print(f"study {name}: {n_trials} trials, {args.sampler} sampler, seeds {args.seeds}, "
          f"storage {args.storage or sweep_dir / studies.JOURNAL_FILE}", flush=True)
    interrupted = _run_trials(study, params, n_trials, sweep_dir, stage, args, extra, name, run_trial)
    _write_results(study, params, sweep_dir, stage, args, extra, name)
    if interrupted:
        print("interrupted: the running trial is queued again; re-run the same command to continue the study",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


def _run_trials(study, params, n_trials, sweep_dir, stage, args, extra, name, run_trial) -> bool:
    """Take trials until the study has n_trials; True when Ctrl-C stopped the sweep."""
    from utils.run import study as studies
    from utils.run.trials import TrialOutcome

    while True:
        try:
            trial = studies.next_trial(study, n_trials, sweep_dir)
        except KeyboardInterrupt:
            return True
        if trial is None:
            return False
        run_name = trial.user_attrs.get("run_name") or f"{name}_t{trial.number}"
        studies.claim(trial, run_name)
        values = {}
        try:
            values = studies.suggest(trial, params)
            shown = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in values.items())
            print(f"trial {trial.number} ({run_name}): {shown}", flush=True)
            outcome = run_trial(stage, args.json_path, values, run_name, args.seeds, args.exp_root, extra)
        except KeyboardInterrupt:
            outcome = TrialOutcome(failure="interrupted (Ctrl-C)", interrupted=True)
        trial.set_user_attr("run_dirs", outcome.run_dirs)
        studies.finish_trial(study, trial, outcome, run_name, values)
        if outcome.failure:
            print(f"trial {trial.number} failed: {outcome.failure}", file=sys.stderr, flush=True)
        else:
            print(f"trial {trial.number}: validation All {100 * outcome.score:.2f} % "
                  f"({outcome.seconds:.0f} s)", flush=True)
        _progress(study, params, sweep_dir)
        if outcome.interrupted:
            return True


def _progress(study, params, sweep_dir: Path) -> None:
    """trials.csv after every trial, for whoever watches the sweep."""
    from utils.run import sweep_results as results
    results.write_trials_csv(sweep_dir / results.TRIALS_FILE, results.trial_rows(study, params))


def _write_results(study, params, sweep_dir: Path, stage: str, args, extra: dict, name: str) -> None:
    from utils.run import sweep_results as results

    rows = results.trial_rows(study, params)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    results.write_trials_csv(sweep_dir / results.TRIALS_FILE, rows)
    best = results.best_rows(rows, args.top)
    if not best:
        print(f"no trial of study {name} has finished yet ({len(rows)} recorded); no best.json", file=sys.stderr)
        return
    print(results.markdown_table(best, params))
    values = {p.key: study.best_trial.params[p.key] for p in params}
    config = results.best_config(stage, args.json_path, values, name, args.seeds[0], extra)
    results.write_best(sweep_dir / results.BEST_FILE, config)
    print(f"best: trial {study.best_trial.number}; {sweep_dir / results.BEST_FILE} (run it with "
          f"{'first.py' if stage == 'first' else 'second.py'} --json_path), {sweep_dir / results.TRIALS_FILE}")
    try:
        from utils.viz.sweep_figures import draw_sweep_figures
        draw_sweep_figures(rows, params, sweep_dir)
    except Exception as exc:  # noqa: BLE001 - the study and its files stand without the figures
        print(f"warning: the sweep figures could not be drawn ({type(exc).__name__}: {exc})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
