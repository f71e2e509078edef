"""Typed, validated run configuration: the face of the config modules.

The JSON layout is the published implementation's (sections ``data``, ``model``, ``optim``
plus top-level keys), so its files load unchanged.  Everything is checked once, before any
work starts: an unknown key, a value of the wrong type or a value outside its choices is a
:class:`ConfigError` naming the key, the value and what is allowed.  Nothing downstream
reads raw dicts or asks whether a key exists.

    utils/config/schema.py   the dataclasses (keys, defaults, help, choices)
    utils/config/values.py   the allowed values of single keys (ranges, names, paths)
    utils/config/rules.py    the rules between keys; what an evaluation-only run records
    utils/config/load.py     the one JSON reader, typing of values, from_dict, resolve
    utils/config/flags.py    the command-line flags and the README's config table

``python -m utils.config`` prints that table.
"""
from utils.config.flags import add_config_flags, field_table, overrides_from_flags, parse_bool, print_table
from utils.config.load import from_dict, load_json, read_json_file, resolve
from utils.config.rules import recorded_form, unused_optim_keys, validate
from utils.config.schema import SECTIONS, Config, DataConfig, ModelConfig, OptimConfig
from utils.config.values import has_control_character, unencodable
from utils.errors import ConfigError

__all__ = ["Config", "DataConfig", "ModelConfig", "OptimConfig", "SECTIONS", "ConfigError", "from_dict",
           "resolve", "load_json", "read_json_file", "validate", "recorded_form", "unused_optim_keys",
           "add_config_flags", "overrides_from_flags", "parse_bool", "field_table", "has_control_character",
           "unencodable"]
