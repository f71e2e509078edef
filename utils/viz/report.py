"""Tables over runs: ``python -m utils.report <dir> [<dir> ...]``.

Collects every finished run (a folder with ``acc.json`` and ``args.json``, and a
checkpoint marked finished) under the given directories, groups the runs by
dataset, model, stage and experiment name, and prints one row per group: All /
Many / Medium / Few accuracy (in percent), FDR (train, test), and where the runs recorded them
top-5 All / Many / Medium / Few (percent, topk.json) and ECE (percent), NLL and Brier
(calibration.json) as mean ± sample
standard deviation over the seeds recorded in the runs, with the number of
seeds.  Markdown goes to the terminal; the same numbers (mean and std in
separate columns) go to a CSV file when asked (``--csv``).
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from utils.config.load import read_json_file
from utils.errors import UserError
from utils.names import ACC_FILE, ARGS_FILE, CALIBRATION_FILE, CHECKPOINT_FILE, FDR_FILE, GROUPS, TOPK_FILE
from utils.run.plan import run_state

KEYS = ["dataset", "model", "stage", "exp_name"]
ACC = ["All", *GROUPS]
FDR = ["FDR_train", "FDR_test"]
TOP5 = [f"Top5_{g}" for g in ACC]
CALIBRATION = ["ECE", "NLL", "Brier"]
METRICS = ACC + FDR + TOP5 + CALIBRATION


class ReportError(UserError):
    pass


def _read_json(path: Path):
    return read_json_file(path, f"{path} is unreadable", ReportError)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _hidden(run: Path, root: Path) -> bool:
    """Below a folder whose name starts with '.' (e.g. the copy --overwrite moves aside until the
    new run has started)."""
    return any(part.startswith(".") for part in run.relative_to(root).parts)


def _unfinished(run: Path) -> str:
    """Why a run with acc.json is not finished ('' if it is): its checkpoint says so (a run killed
    during its final evaluation has written acc.json already)."""
    if not (run / CHECKPOINT_FILE).is_file():
        return ""  # a run of the published implementation: acc.json is its end
    state = run_state(run)
    return "" if state.finished else state.describe_unfinished()


def collect_runs(dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One row per run: the group keys, seed, path and metrics (accuracy in percent).

    A run counts once per seed of its group (the seed its args.json records): a copy of a run
    folder is not another seed.  Unfinished runs and hidden folders are skipped, with a warning
    for the former."""
    rows, seen = [], {}
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise ReportError(f"{d} is not a directory; give run directories or folders above them (e.g. exp)")
        for acc_file in sorted(d.rglob(ACC_FILE)):
            run = acc_file.parent
            args_file = run / ARGS_FILE
            if not args_file.is_file() or _hidden(run, d):
                continue
            why = _unfinished(run)
            if why:
                _warn(f"skipping {run}: it has not finished ({why}); --resume it to finish")
                continue
            args = _read_json(args_file)
            acc = _read_json(acc_file)
            fdr = _read_json(run / FDR_FILE) if (run / FDR_FILE).is_file() else {}
            # runs of the published implementation, and older ones, have neither file: NaN there
            top5 = _read_json(run / TOPK_FILE).get("top5", {}) if (run / TOPK_FILE).is_file() else {}
            calib = _read_json(run / CALIBRATION_FILE) if (run / CALIBRATION_FILE).is_file() else {}
            try:
                row = {"dataset": args["data"]["name"], "model": args["model"]["name"],
                       "stage": args.get("project_name", ""), "exp_name": args.get("exp_name", run.parent.name),
                       "seed": args.get("seeds", run.name), "run": str(run)}
                row.update({g: 100.0 * float(acc[g]) for g in ACC})
                # param_search runs evaluate the validation set; their fdr.json says "val"
                row["FDR_train"] = float(fdr.get("train", float("nan")))
                row["FDR_test"] = float(fdr.get("test", fdr.get("val", float("nan"))))
                row.update({f"Top5_{g}": 100.0 * float(top5.get(g, float("nan"))) for g in ACC})
                row.update({m: float(calib.get(m, float("nan"))) for m in CALIBRATION})
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise ReportError(f"{run}: acc.json/args.json/fdr.json/topk.json/calibration.json lack a field or hold another type "
                                  f"({type(exc).__name__}: {exc})") from None
            if args.get("param_search"):
                row["exp_name"] = f"{row['exp_name']} (val, id {args.get('param_search_id', 0)})"
            identity = tuple(str(row[k]) for k in KEYS) + (str(row["seed"]),)
            if identity in seen:
                _warn(f"{run} records seed {row['seed']} of {'/'.join(identity[:-1])}, like {seen[identity]}: "
                      "a copy of one run counts once")
                continue
            seen[identity] = run
            rows.append(row)
    return pd.DataFrame(rows, columns=KEYS + ["seed", "run"] + METRICS)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Per group: n_seeds, <metric>_mean, <metric>_std (sample std, ddof=1; NaN for one seed)."""
    grouped = runs.groupby(KEYS, sort=True)
    out = grouped[METRICS].agg(["mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    out.insert(0, "n_seeds", grouped.size())
    out.insert(1, "seeds", grouped["seed"].agg(lambda s: " ".join(str(v) for v in sorted(s))))
    return out.reset_index()


def apply_filters(table: pd.DataFrame, patterns: Sequence[str]) -> pd.DataFrame:
    """Keep groups whose 'dataset/model/stage/exp_name' matches every pattern:
    a shell glob if it has * ? [, else a case-insensitive substring."""
    if not patterns:
        return table
    names = table[KEYS].astype(str).agg("/".join, axis=1)
    keep = pd.Series(True, index=table.index)
    for pat in patterns:
        if any(ch in pat for ch in "*?["):
            keep &= names.map(lambda n: fnmatch.fnmatchcase(n.lower(), pat.lower()) or
                              fnmatch.fnmatchcase(n.lower(), f"*{pat.lower()}*"))
        else:
            keep &= names.str.lower().str.contains(pat.lower(), regex=False)
    return table[keep]


def sort_table(table: pd.DataFrame, key: Optional[str], ascending: Optional[bool]) -> pd.DataFrame:
    if not key:
        return table
    columns = {c.lower(): c for c in table.columns}
    col = columns.get(key.lower()) or columns.get(f"{key.lower()}_mean")
    if col is None:
        allowed = ", ".join(KEYS + ["n_seeds"] + METRICS)
        raise ReportError(f"--sort {key!r} is not a column; choose one of: {allowed}")
    if ascending is None:  # metrics: best first (the lowest calibration error); names: alphabetical
        lower_is_better = col in {f"{m}_mean" for m in CALIBRATION}
        ascending = lower_is_better or (not col.endswith("_mean") and col != "n_seeds")
    return table.sort_values(col, ascending=ascending, kind="stable", na_position="last")


def _pm(mean: float, std: float, digits: int) -> str:
    if pd.isna(mean):
        return "–"
    if pd.isna(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _recorded(table: pd.DataFrame, columns: list[str]) -> list[str]:
    """The columns that some group of the table has a value of (runs before topk.json and
    calibration.json have none: their tables keep the original columns)."""
    return [m for m in columns if table[f"{m}_mean"].notna().any()]


def to_markdown(table: pd.DataFrame) -> str:
    """Accuracy and top-5 in percent, FDR, then ECE (in percent, as papers print it), NLL and Brier."""
    extra = _recorded(table, TOP5 + CALIBRATION)
    header = KEYS + ["seeds"] + ACC + FDR + [("ECE (%)" if m == "ECE" else m) for m in extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        cells = [str(r[k]) for k in KEYS] + [str(int(r["n_seeds"]))]
        cells += [_pm(r[f"{m}_mean"], r[f"{m}_std"], 2) for m in ACC]
        cells += [_pm(r[f"{m}_mean"], r[f"{m}_std"], 2) for m in FDR]
        for m in extra:
            scale = 100.0 if m == "ECE" else 1.0
            cells.append(_pm(r[f"{m}_mean"] * scale, r[f"{m}_std"] * scale, 2 if m in TOP5 + ["ECE"] else 3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m utils.report",
        description="Mean ± std over seeds of every run under the given directories, grouped by dataset, model, "
                    "stage and experiment name. Accuracy in percent (class-averaged All, Many, Medium, Few); "
                    "FDR of the train and test features. Std is the sample standard deviation (n-1).")
    parser.add_argument("dirs", nargs="+", help="run directories or folders above them (e.g. exp)")
    parser.add_argument("--csv", nargs="?", const="", default=None, metavar="FILE",
                        help="also write the table as CSV: to FILE, or with --csv alone to report.csv in the first "
                             "directory given (beside the runs); default: no CSV")
    parser.add_argument("--sort", default="", metavar="COLUMN",
                        help="sort by a column: All, Many, Medium, Few, FDR_train, FDR_test, Top5_All ... Top5_Few (best "
                             "first), ECE, NLL, Brier (best = lowest first), "
                             "n_seeds, dataset, model, stage, exp_name (default: by the group keys)")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--ascending", dest="ascending", action="store_true", default=None,
                       help="sort ascending")
    order.add_argument("--descending", dest="ascending", action="store_false", help="sort descending")
    parser.add_argument("--filter", action="append", default=[], metavar="PATTERN",
                        help="keep groups whose dataset/model/stage/exp_name contains PATTERN (or matches it as a "
                             "shell glob); repeat to require several")
    parser.add_argument("--runs", action="store_true", help="also list every run (one row per seed)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = collect_runs(args.dirs)
        if runs.empty:
            raise ReportError("no runs found (folders with acc.json and args.json) under " + ", ".join(args.dirs))
        table = sort_table(apply_filters(summarise(runs), args.filter), args.sort, args.ascending)
        if table.empty:
            raise ReportError(f"no group matches --filter {' '.join(args.filter)}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(to_markdown(table))
    if args.runs:
        print()
        print(runs.to_string(index=False))
    if args.csv is not None:
        target = Path(args.csv) if args.csv else Path(args.dirs[0]) / "report.csv"
        try:
            table.to_csv(target, index=False, float_format="%.6g")
        except OSError as exc:
            print(f"error: cannot write {target}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"\n{len(table)} groups from {len(runs)} runs; CSV written to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
