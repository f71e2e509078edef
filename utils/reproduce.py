"""``python -m utils.reproduce cifar100|cifar10|digits``: the papers' comparison in one command.

The methods, in the order they must run (each stage 2 reads its stage 1):

    naive CE                          first.py  naive.json
    WD (WB's stage 1: CE + WD)        first.py  wb_first.json
    WB: then CB + WD + MaxNorm        second.py wb_second.json --retrain
    the paper's stage 1: WD + FR + ETF first.py first.json
    the paper: then multiplicative LA second.py second.json

for ResNet-34 (CIFAR; ResNet-18 for the Digits demo) and, on CIFAR-100, ResNet-32 (the
``*_resnet32.json`` files; the paper's method there has a Linear classifier, since an ETF
needs as many feature dimensions as classes), over ``--seeds``.

    --dry-run      print the commands (the default)
    --emit slurm   write a job-array script, one task per seed, running that seed's commands
    --run          run them here, one after another, each with --resume (a finished run is
                   left as it is, an unfinished one continues)
    --table        only print the table of the runs already there

After ``--run`` (and with ``--table``) it prints the runs' table beside the published
numbers (utils/viz/reproduction.py) and the difference.  Nothing imports this module.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from utils.config.load import read_json_file
from utils.errors import UserError

DATASETS = {"cifar100": "Cifar100", "cifar10": "Cifar10", "digits": "Digits"}
# (method, label, stage, JSON file stem, extra flags)
METHODS = (
    ("naive", "naive CE", "first", "naive", ()),
    ("wd", "WD (CE + WD)", "first", "wb_first", ()),
    ("wb", "WB (WD, then CB + WD + MaxNorm)", "second", "wb_second", ("--retrain",)),
    ("paper_stage1", "paper stage 1 (WD + FR + ETF)", "first", "first", ()),
    ("paper", "paper (WD + FR + ETF, then multiplicative LA)", "second", "second", ()),
)
RESNET32_SUFFIX = "_resnet32"
SLURM_FILE = "reproduce_{dataset}.sbatch"


class ReproduceError(UserError):
    pass


def config_files(dataset: str, json_root: Path = Path("jsons")) -> list[tuple]:
    """(method, label, stage, JSON path, extra flags) of every run, ResNet-34 (or the demo's) first."""
    folder = json_root / DATASETS[dataset]
    suffixes = ["", RESNET32_SUFFIX] if dataset == "cifar100" else [""]
    return [(method, label, stage, folder / f"{stem}{suffix}.json", flags)
            for suffix in suffixes for method, label, stage, stem, flags in METHODS]


def commands(dataset: str, seeds: Sequence[int], json_root: Path = Path("jsons"), resume: bool = True) -> list[list[str]]:
    """Every command, seed by seed (a seed's stage 2 after its stage 1)."""
    out = []
    for seed in seeds:
        for _, _, stage, path, flags in config_files(dataset, json_root):
            out.append(["python", f"{stage}.py", "--json_path", str(path), "--seeds", str(seed), *flags,
                        *(["--resume"] if resume else [])])
    return out


def slurm_script(dataset: str, seeds: Sequence[int], json_root: Path = Path("jsons")) -> str:
    """A job array, one task per seed, each running its seed's commands in order; a requeued task
    continues where it stopped (--resume)."""
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name=reproduce_{dataset}",
             f"#SBATCH --array=0-{len(seeds) - 1}",
             "#SBATCH --gres=gpu:1 --cpus-per-task=8 --time=48:00:00",
             "#SBATCH --output=logs/reproduce_%A_%a.txt",
             "# the folder of the logs must exist before sbatch: mkdir -p logs",
             "set -euo pipefail",
             f"SEEDS=({' '.join(str(s) for s in seeds)})",
             "seed=${SEEDS[$SLURM_ARRAY_TASK_ID]}"]
    for _, _, stage, path, flags in config_files(dataset, json_root):
        lines.append(shlex.join(["python", f"{stage}.py", "--json_path", str(path)]) + ' --seeds "$seed" '
                     + " ".join([*flags, "--resume"]))
    lines.append(f"# when every task has finished: python -m utils.reproduce {dataset} --table")
    return "\n".join(lines) + "\n"


def table_rows(dataset: str, json_root: Path = Path("jsons")):
    """The comparison's rows: each method's run group, named by its JSON (files that are absent are left out)."""
    from utils.viz.reproduction import Row
    rows = []
    for method, label, stage, path, _ in config_files(dataset, json_root):
        if not path.is_file():
            continue
        raw = read_json_file(path, str(path), ReproduceError)
        rows.append(Row(method, label, raw["data"]["name"], raw["model"]["name"], stage, raw["exp_name"]))
    return rows


def print_table(dataset: str, exp_root: Path, json_root: Path) -> None:
    from utils.viz import reproduction
    rows = table_rows(dataset, json_root)
    print(reproduction.to_markdown(reproduction.comparison_rows(rows, exp_root)))
    note = reproduction.missing_note(rows)
    if note:
        print("\n" + note)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m utils.reproduce",
        description="The papers' comparison (naive CE, WD, WB, the paper's WD + FR + ETF then LA; ResNet-34 and "
                    "ResNet-32 on CIFAR) over seeds: print, emit or run the commands, then the table beside the "
                    "published numbers.")
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED",
                        help="seeds of every method (default: 0 1 2)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the commands (the default)")
    mode.add_argument("--emit", choices=["slurm"], help="write a Slurm job-array script (one task per seed)")
    mode.add_argument("--run", action="store_true", help="run the commands here in order, then print the table")
    mode.add_argument("--table", action="store_true", help="print the table of the runs already there")
    parser.add_argument("--out", default="", help=f"--emit slurm: the script's path (default: {SLURM_FILE})")
    parser.add_argument("--exp_root", default="exp", help="where the runs are (the bundled stage-2 JSONs read "
                        "their stage 1 from ./exp; default: exp)")
    parser.add_argument("--json_root", default="jsons", help=argparse.SUPPRESS)
    return parser


def _check_configs(dataset: str, json_root: Path) -> None:
    missing = [str(p) for *_, p, _ in config_files(dataset, json_root) if not p.is_file()]
    if missing:
        raise ReproduceError(f"{len(missing)} config file(s) are missing: {', '.join(missing)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    json_root, exp_root = Path(args.json_root), Path(args.exp_root)
    try:
        if len(set(args.seeds)) != len(args.seeds):
            raise ReproduceError(f"--seeds {' '.join(map(str, args.seeds))} names a seed twice; give each once")
        if args.table:
            print_table(args.dataset, exp_root, json_root)
            return 0
        if args.emit:
            target = Path(args.out or SLURM_FILE.format(dataset=args.dataset))
            target.write_text(slurm_script(args.dataset, args.seeds, json_root))
            print(f"wrote {target}: sbatch {target}")
            return 0
        if not args.run:
            for command in commands(args.dataset, args.seeds, json_root):
                print(shlex.join(command))
            return 0
        if exp_root != Path("exp"):
            raise ReproduceError(f"--run with --exp_root {args.exp_root!r}: the bundled stage-2 JSONs read their "
                                 "stage-1 runs from ./exp; run from the folder that holds exp/ instead")
        _check_configs(args.dataset, json_root)
        for command in commands(args.dataset, args.seeds, json_root):
            print("$ " + shlex.join(command), flush=True)
            code = subprocess.call([sys.executable, *command[1:]])
            if code != 0:
                print(f"error: {shlex.join(command)} ended with exit code {code}; fix it and run the same "
                      "command again (finished runs are kept)", file=sys.stderr)
                return code
        print_table(args.dataset, exp_root, json_root)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or 'a file'}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
