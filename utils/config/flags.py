"""Command-line flags: every config field is a flag, named as the original named them
(--exp_name, --data_imb_factor, --model_use_etf, --optim_weight_decay, ...); flags given
together with --json_path override the JSON value.  Also the README's config table, built
from the same fields (``python -m utils.config`` prints it).
"""
from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from utils.config.schema import NOT_BUILT, SECTIONS, Config, base_type, default_of, field_type, key_of
from utils.config.values import RANGES, TEXT_RULES
from utils.errors import ConfigError


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "y", "on"):
        return True
    if low in ("false", "0", "no", "n", "off"):
        return False
    raise ValueError(f"expected true/false/1/0, got {text!r}")


def _parse_flag_value(text: str, tp, key: str) -> Any:
    base, optional = base_type(tp)
    if optional and text.strip().lower() in ("none", "null"):
        return None
    try:
        if base is bool:
            return parse_bool(text)
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if base is list:
            text = text.strip()
            if text.startswith("["):
                return json.loads(text)
            return [json.loads(t) if t.strip() not in ("",) else t for t in text.split(",")]
        return text
    except (ValueError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--{key.replace('.', '_')} {text!r}: {exc}") from None


def flag_specs():
    """(flag name, section, field) for every configurable field."""
    for f in fields(Config):
        if f.name in SECTIONS:
            continue
        if f.name == "seeds":
            continue  # handled by the entry points (several seeds allowed)
        yield f.name, "", f
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            yield f"{section}_{f.name}", section, f


def add_config_flags(parser) -> None:
    import argparse
    groups = {"": parser.add_argument_group("run"),
              "data": parser.add_argument_group("data (JSON section 'data')"),
              "model": parser.add_argument_group("model (JSON section 'model')"),
              "optim": parser.add_argument_group("optim (JSON section 'optim')")}
    for flag, section, f in flag_specs():
        base, _ = base_type(field_type(SECTIONS.get(section, Config), f.name))
        meta = {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR", list: "LIST"}[base]
        choices = f.metadata.get("choices")
        help_text = f.metadata["help"]
        if choices:
            help_text += f" {{{', '.join(map(str, choices))}}}"
        default = default_of(f)
        help_text += f" (default: {default})"
        bare = {"nargs": "?", "const": "true"} if base is bool else {}  # --deterministic alone means true
        groups[section].add_argument(f"--{flag}", metavar=meta, default=argparse.SUPPRESS,
                                     help=help_text.replace("%", "%%"), **bare)


def overrides_from_flags(namespace) -> dict:
    """Nested dict of the flags the user actually gave."""
    given = vars(namespace)
    out: dict = {}
    for flag, section, f in flag_specs():
        if flag not in given:
            continue
        cls = SECTIONS.get(section, Config)
        value = _parse_flag_value(given[flag], field_type(cls, f.name), key_of(section, f.name))
        if section:
            out.setdefault(section, {})[f.name] = value
        else:
            out[f.name] = value
    return out


def field_table() -> list[tuple[str, str, str, str]]:
    """(key, default, allowed, meaning) rows for the README's config table."""
    rows = []
    specs = list(flag_specs())
    seeds = next(f for f in fields(Config) if f.name == "seeds")
    specs.insert(2, ("seeds", "", seeds))
    for flag, section, f in specs:
        default = default_of(f)
        base, optional = base_type(field_type(SECTIONS.get(section, Config), f.name))
        choices = f.metadata.get("choices")
        if choices:
            allowed = " \\| ".join(map(str, choices))
        elif f.metadata.get("check") in RANGES:
            allowed = RANGES[f.metadata["check"]].text(base is int)
        elif f.metadata.get("check") in TEXT_RULES:
            allowed = {"name": "folder name (at most 200 bytes)", "path": "path (valid Unicode)",
                       "device": "auto \\| cpu \\| cuda \\| cuda:N"}[f.metadata["check"]]
        else:
            allowed = {bool: "true \\| false", int: "integer", float: "number", str: "string", list: "list"}[base]
        if optional:
            allowed += " or null"
        built = NOT_BUILT.get((section, f.name))
        if built is not None:
            allowed += " (this version: " + ", ".join(json.dumps(b) for b in built) + ")"
        rows.append((key_of(section, f.name), json.dumps(default), allowed, f.metadata["help"]))
    return rows


def print_table() -> None:
    """The README's config table (``python -m utils.config``)."""
    print("| key | default | allowed | meaning |")
    print("|---|---|---|---|")
    for row in field_table():
        key, default, allowed, meaning = row
        print(f"| `{key}` | `{default}` | {allowed} | {meaning.replace('|', chr(92) + '|')} |")
