"""The papers' comparison as a table: this project's runs (mean ± std over seeds, from the files
they wrote, as ``python -m utils.report``) beside the published numbers, and the difference.

Published numbers, CIFAR-100-LT, imbalance 100, ResNet-34 (All, Many / Medium / Few test
accuracy in %):

- WB's paper (Alshammari et al., CVPR 2022), Table 1: CE 38.38 (64.05 / 35.80 / 11.43), WD
  46.08, WB 53.35 (72.60 / 51.86 / 32.63).
- WB's repository notebooks, with flip test-time augmentation (SPEC 9): naive CE 40.0
  (67.4 / 38.1 / 10.4), CE + WD 5e-3 47.9 (78.0 / 46.9 / 13.9), WB 53.1 (72.2 / 49.6 / 34.9).

Nothing is given here for the paper's own method (WD + FR + ETF, then LA), for CIFAR-10-LT,
for ResNet-32 or for Digits-LT: those rows say "not given" rather than borrow a number.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from utils.viz.report import ACC, collect_runs, summarise


@dataclass(frozen=True)
class Published:
    """One published result: All and, where the source gives them, Many / Medium / Few."""
    source: str
    All: float
    groups: Optional[tuple] = None

    def text(self) -> str:
        if self.groups is None:
            return f"{self.All:.2f}"
        return f"{self.All:.2f} ({' / '.join(f'{g:.2f}' for g in self.groups)})"


WB_TABLE1 = "WB paper, Table 1"
WB_NOTEBOOKS = "WB notebooks, flip TTA (SPEC 9)"
SOURCES = (WB_TABLE1, WB_NOTEBOOKS)

# (dataset, model, method) -> the published numbers, by source
PUBLISHED = {
    ("Cifar100", "ResNet34", "naive"): (Published(WB_TABLE1, 38.38, (64.05, 35.80, 11.43)),
                                        Published(WB_NOTEBOOKS, 40.0, (67.4, 38.1, 10.4))),
    ("Cifar100", "ResNet34", "wd"): (Published(WB_TABLE1, 46.08),
                                     Published(WB_NOTEBOOKS, 47.9, (78.0, 46.9, 13.9))),
    ("Cifar100", "ResNet34", "wb"): (Published(WB_TABLE1, 53.35, (72.60, 51.86, 32.63)),
                                     Published(WB_NOTEBOOKS, 53.1, (72.2, 49.6, 34.9))),
}


@dataclass(frozen=True)
class Row:
    """One method of the comparison and the run group that holds it."""
    method: str        # naive, wd, wb, paper_stage1, paper
    label: str         # what the table calls it
    dataset: str
    model: str
    stage: str
    exp_name: str


def _measured(runs: pd.DataFrame, row: Row) -> Optional[pd.Series]:
    if runs.empty:
        return None
    table = summarise(runs)
    match = table[(table.dataset == row.dataset) & (table.model == row.model) & (table.stage == row.stage)
                  & (table.exp_name == row.exp_name)]
    return None if match.empty else match.iloc[0]


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"


def comparison_rows(rows: Sequence[Row], exp_root: Path) -> list[dict]:
    """Per method: ours (seeds, All, Many, Medium, Few) and each source's number with All's difference."""
    dirs = sorted({Path(exp_root) / r.dataset / r.model for r in rows if (Path(exp_root) / r.dataset / r.model).is_dir()})
    runs = collect_runs(dirs) if dirs else pd.DataFrame()
    out = []
    for row in rows:
        got = _measured(runs, row)
        line = {"method": row.label, "model": row.model, "seeds": 0 if got is None else int(got["n_seeds"])}
        for g in ACC:
            line[g] = "not run" if got is None else _pm(got[f"{g}_mean"], got[f"{g}_std"])
        published = {p.source: p for p in PUBLISHED.get((row.dataset, row.model, row.method), ())}
        for source in SOURCES:
            p = published.get(source)
            line[source] = p.text() if p else "not given"
            line[f"Δ All vs {source}"] = ("–" if p is None or got is None
                                          else f"{got['All_mean'] - p.All:+.2f}")
        out.append(line)
    return out


def to_markdown(lines: list[dict]) -> str:
    header = list(lines[0])
    text = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    text += ["| " + " | ".join(str(line[h]) for h in header) + " |" for line in lines]
    return "\n".join(text)


def missing_note(rows: Sequence[Row]) -> str:
    """Which rows have no published number here, said plainly under the table."""
    missing = [r.label + f" ({r.model})" for r in rows if (r.dataset, r.model, r.method) not in PUBLISHED]
    if not missing:
        return ""
    return ("No published number is given here for: " + "; ".join(missing) + ". (Sources: WB's paper, Table 1, and "
            "WB's notebooks for CIFAR-100-LT with ResNet-34 only; the Hasegawa & Sato paper's own numbers are not "
            "transcribed.)")

