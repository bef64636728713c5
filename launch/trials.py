"""Trials: the settings of the keys that are not the arm, one run folder each. An arm is what the
comparison is about (depth x initialisation); a trial is one point of a grid over other keys (a learning
rate, an image size, a head); a run is (arm, trial, seed). Torch-free: the sweep expands trials, names
them and checks them before anything is submitted.

Names are short, readable and stable across runs and machines: made from the keys' last parts and the
values, in key order (`lr0.05-image_size384`), with a hash of the whole where that would be too long.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re

from dr_resnet.config import ConfigError

MAX_NAME = 60  # characters of a trial's folder name before it is shortened with a hash


def parse_grid(texts: list[str]) -> dict[str, list[str]]:
    """--grid KEY=V1,V2 options (repeatable) as {key: [values]}; an error naming the option otherwise."""
    grid: dict[str, list[str]] = {}
    for text in texts:
        key, sep, values = text.partition("=")
        listed = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or "." not in key or not listed:
            raise ConfigError(f"--grid {text!r}: expected section.key=value1,value2 (e.g. train.lr=0.01,0.05)")
        if key in grid:
            raise ConfigError(f"--grid names {key} twice: give its values once, comma-separated")
        grid[key.strip()] = listed
    return grid


def grid_of(content: object, origin: str) -> dict[str, list[str]]:
    """A sweep file's `grid:` (section.key -> list of values) as strings, checked."""
    if content is None:
        return {}
    if not isinstance(content, dict) or not all(isinstance(v, list) and v for v in content.values()):
        raise ConfigError(f"{origin}: 'grid' maps section.key names to non-empty lists of values")
    return {str(k): [str(v) for v in values] for k, values in content.items()}


def expand(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values, keys in their given order, values in theirs ([{}] without a
    grid: one trial, the arm's own settings)."""
    keys = list(grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    names = [trial_name(c) for c in combos]
    if len(set(names)) != len(names):
        raise ConfigError(f"grid {grid}: two trials would share a folder name; give each key distinct values")
    return combos


def trial_name(values: dict[str, str]) -> str:
    """A trial's folder name: '' for no trial, else its keys' last parts with their values."""
    if not values:
        return ""
    name = "-".join(f"{key.rsplit('.', 1)[-1]}{_safe(value)}" for key, value in values.items())
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 9]}-{digest}"
    return name


def _safe(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", value)


def overrides_of(values: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in values.items()]
