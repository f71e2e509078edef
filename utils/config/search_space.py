"""What a hyper-parameter search may vary: ``--space KEY=SPEC`` of ``python -m utils.sweep``.

    optim.weight_decay=log:1e-4:1e-2      log-uniform number in [1e-4, 1e-2]
    model.logit_adjustment_tau=float:0:2  uniform number in [0, 2]
    optim.drw=int:0:10                    integer in [0, 10]
    optim.loss_type=choice:CE,CB          one of the listed values
    optim.weight_decay=grid:1e-4,1e-3     one of the listed values; with --sampler grid every
                                          combination of the grid keys is run once

Every KEY is a key of the config schema and every value a SPEC can produce (both ends of a
range, every listed value) passes that key's own check, so a spec outside a key's range is
refused before any trial, in one line.  Rules between keys (CB with a bad beta...) depend on
the other values of a trial; a trial that breaks one is recorded as failed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Optional

from utils.config.load import coerce
from utils.config.schema import SECTIONS, Config, base_type, field_type, key_of
from utils.config.values import check_field
from utils.errors import ConfigError

KINDS = ("log", "float", "int", "choice", "grid")
USAGE = ("give KEY=KIND:..., KIND one of log:LOW:HIGH, float:LOW:HIGH, int:LOW:HIGH, choice:A,B,... or "
         "grid:A,B,... (e.g. optim.weight_decay=log:1e-4:1e-2)")
# keys the sweep sets itself for every trial: the run's name, folder and evaluation split
SWEEP_OWNED = ("exp_name", "project_name", "seeds", "param_search", "param_search_id", "load_checkpoint",
               "device")


@dataclass(frozen=True)
class Param:
    """One searched key: a range (log/float/int) or a finite list of values (choice/grid)."""
    key: str
    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    values: tuple = ()

    @property
    def is_finite(self) -> bool:
        return self.kind in ("choice", "grid")

    def spec(self) -> str:
        if self.is_finite:
            return f"{self.key}={self.kind}:" + ",".join(_text(v) for v in self.values)
        return f"{self.key}={self.kind}:{_text(self.low)}:{_text(self.high)}"


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def schema_field(key: str):
    """(section, dataclass field) of a dotted key; an unknown key is a ConfigError with a suggestion."""
    import difflib
    section, _, name = key.rpartition(".")
    cls = SECTIONS.get(section) if section else Config
    if cls is None:
        raise ConfigError(f"--space {key!r}: unknown section {section!r}; the sections are data, model, optim "
                          "(or a top-level key without a section)")
    known = {f.name: f for f in fields(cls) if not (cls is Config and f.name in SECTIONS)}
    if name not in known:
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f"; did you mean {key_of(section, close[0])!r}?" if close else ""
        raise ConfigError(f"--space {key!r}: not a config key{hint} (python -m utils.config lists them)")
    if not section and name in SWEEP_OWNED:
        raise ConfigError(f"--space {key!r}: the sweep sets {name} itself for every trial; search another key")
    return section, known[name], cls


def _typed(text: str, tp, key: str):
    """A value written in a spec, typed as the key's JSON value would be."""
    base, optional = base_type(tp)
    text = text.strip()
    if optional and text == "null":
        return None
    if base is bool:
        if text.lower() in ("true", "1"):
            return True
        if text.lower() in ("false", "0"):
            return False
        raise ValueError(f"{text!r} is not true or false")
    if base is int:
        return int(text)
    if base is float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"{text!r} is not a finite number")
        return value
    if base is str:
        if not text:
            raise ValueError("an empty value")
        return text
    raise ValueError(f"{key} holds a list, which cannot be searched")


def parse_param(text: str) -> Param:
    """``KEY=KIND:...`` -> Param, every value it can produce checked against the key's rules."""
    key, eq, spec = text.partition("=")
    key = key.strip()
    if not eq or not key or ":" not in spec:
        raise ConfigError(f"--space {text!r} is not KEY=SPEC; {USAGE}")
    kind, _, rest = spec.partition(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise ConfigError(f"--space {text!r}: unknown kind {kind!r}; {USAGE}")
    section, f, cls = schema_field(key)
    tp = field_type(cls, f.name)
    base, _ = base_type(tp)
    if base is list:
        raise ConfigError(f"--space {text!r}: {key} holds a list, which cannot be searched")
    try:
        if kind in ("choice", "grid"):
            items = rest.split(",")
            values = tuple(_typed(v, tp, key) for v in items)
            if len(set(values)) != len(values):
                raise ValueError("a value is listed twice")
            param = Param(key, kind, values=values)
        else:
            if base not in (int, float) or (kind == "int") != (base is int):
                want = "int:LOW:HIGH, choice or grid" if base is int else (
                    "log:LOW:HIGH, float:LOW:HIGH, choice or grid" if base is float else "choice or grid")
                what = {int: "an integer", float: "a number", bool: "a true/false", str: "a text"}[base]
                raise ValueError(f"{key} is {what} key: use {want}")
            parts = rest.split(":")
            if len(parts) != 2:
                raise ValueError(f"expected {kind}:LOW:HIGH")
            low, high = (_typed(p, tp, key) for p in parts)
            if not low < high:
                raise ValueError(f"LOW {_text(low)} must be below HIGH {_text(high)}")
            if kind == "log" and low <= 0:
                raise ValueError(f"a log range needs LOW > 0, got {_text(low)}")
            param = Param(key, kind, low=low, high=high)
    except ValueError as exc:
        raise ConfigError(f"--space {text!r}: {exc}; {USAGE}") from None
    for value in (param.values if param.is_finite else (param.low, param.high)):
        try:
            check_field(section, f, coerce(value, tp, key))
        except ConfigError as exc:
            raise ConfigError(f"--space {text!r}: {exc}") from None
    return param


def parse_space(texts: list[str], sampler: str) -> list[Param]:
    """Every --space, each key once; the grid sampler needs a finite list for every key."""
    if not texts:
        raise ConfigError(f"no --space given; name at least one key to search ({USAGE})")
    params = [parse_param(t) for t in texts]
    keys = [p.key for p in params]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ConfigError(f"--space names {twice[0]} twice; give each key once")
    ranges = [p.spec() for p in params if not p.is_finite]
    if sampler == "grid" and ranges:
        raise ConfigError(f"--sampler grid runs every combination of listed values, but --space {ranges[0]} is a "
                          "range; list its values (grid:A,B,...) or use --sampler tpe or random")
    return params


def grid_size(params: list[Param]) -> int:
    return math.prod(len(p.values) for p in params)


def nested_overrides(values: dict) -> dict:
    """{'optim.weight_decay': 1e-3, 'exp_name': 'x'} -> {'optim': {'weight_decay': 1e-3}, 'exp_name': 'x'},
    the layout resolve() merges over a JSON."""
    out: dict = {}
    for key, value in values.items():
        section, _, name = key.rpartition(".")
        if section:
            out.setdefault(section, {})[name] = value
        else:
            out[name] = value
    return out
