"""A run's configuration as the command line sees it, without torch: YAML configs turned into
command-line tokens (so `--config` values meet the same types, choices and ranges as flags), the
flags a command line gives explicitly (a resumed run refuses those that differ from it), a
finite-number type, and help that states each default once.
"""

from __future__ import annotations

import argparse
import math

import yaml

from errors import UsageError


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" where a default exists and the help does not state it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def config_tokens(path: str, parser: argparse.ArgumentParser, skip: tuple = ()) -> list[str]:
    """The flags of a YAML config as command-line tokens, so they meet the same checks."""
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path}: cannot read ({type(e).__name__})") from None
    if cfg is None:
        return []
    if not isinstance(cfg, dict):
        raise UsageError(f"--config {path}: not a mapping of flag: value")
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    unknown = sorted(str(k) for k in cfg if k not in actions)
    if unknown:
        raise UsageError(f"--config {path}: unknown keys {', '.join(unknown)}")
    tokens = []
    for key, value in cfg.items():
        if key in skip or value is None:
            continue
        if isinstance(value, (list, dict)) or (actions[key].nargs == 0 and not isinstance(value, bool)):
            raise UsageError(f"--config {path}: {key}: {value!r} is not a valid value for --{key}")
        if actions[key].nargs == 0:
            tokens += [f"--{key}"] if value else []
        else:
            tokens += [f"--{key}", str(value)]
    return tokens


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the flags in `argv` itself (not defaults)."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))
