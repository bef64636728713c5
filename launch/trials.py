"""Trials: the settings of the keys that are not the arm, one run folder each. An arm is what the
comparison is about (depth x initialisation); a trial is one point of a grid over other keys (a learning
rate, an image size, a head); a run is (arm, trial, seed). Torch-free: the sweep expands trials, names
them and checks them before anything is submitted.

Names are short, readable and stable across runs and machines: made from the keys' last parts and the
values, in key order (`lr0.05-image_size384`), with a hash of the whole where that would be too long.

A search draws its trials instead of listing them: `loguniform(lo, hi)` (rates), `uniform(lo, hi)`,
`intuniform(lo, hi)` or `choice(a, b, ...)` per key. Trial i's value of a key comes from a generator seeded by
(the search's own seed, i, the key) alone: every arm gets the same number of trials and, where two arms search
the same range, the same values (common random numbers: their difference is not a difference of luck); a larger
trial count keeps the earlier draws (their folders, finished, are not run again). Values keep 3 significant
digits, so a trial's name is its exact setting.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import zlib
from dataclasses import dataclass

import numpy as np

from dr_resnet.config import NOT_SEARCHED, ConfigError
from dr_resnet.seeds import derive_seed

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
    check_varied(grid, "--grid")
    return grid


def grid_of(content: object, origin: str) -> dict[str, list[str]]:
    """A sweep file's `grid:` (section.key -> list of values) as strings, checked."""
    if content is None:
        return {}
    if not isinstance(content, dict) or not all(isinstance(v, list) and v and "." in str(k) for k, v in content.items()):
        raise ConfigError(f"{origin}: 'grid' maps section.key names to non-empty lists of values")
    check_varied(content, origin)
    return {str(k): [str(v) for v in values] for k, values in content.items()}


def check_varied(keys: object, origin: str) -> None:
    """Refuse a grid or search over a key that decides the held-out score or the arm (config.NOT_SEARCHED)."""
    for key in keys:
        if str(key) in NOT_SEARCHED:
            raise ConfigError(f"{origin}: {key} may not be varied by a grid or search: it {NOT_SEARCHED[str(key)]}")


def equal_keys(per_arm: dict[str, set[str]], origin: str, verb: str) -> None:
    """Refuse arms that vary different keys: equal budgets mean equal search spaces (ranges may differ)."""
    every = set().union(*per_arm.values()) if per_arm else set()
    for arm, keys in per_arm.items():
        missing = sorted(every - keys)
        if missing:
            other = next(a for a, k in per_arm.items() if missing[0] in k)
            raise ConfigError(f"{origin}: arm {arm} {verb} no {missing[0]}, arm {other} does: equal budgets need "
                              f"equal search spaces; give {missing[0]} to every arm (each may have its own values)")


def split_per_arm(content: object, origin: str, arms: list[str]) -> tuple[object, dict[str, object]]:
    """A `grid:` or `search:` block's keys for every arm, and its `arms:` entry (arm -> keys that replace or
    add to those for that arm), checked against the sweep's arms."""
    if not isinstance(content, dict):
        return content, {}
    content = dict(content)
    per_arm = content.pop("arms", None) or {}
    if not isinstance(per_arm, dict):
        raise ConfigError(f"{origin}: 'arms' maps arm names to their own keys")
    unknown = sorted(set(per_arm) - set(arms))
    if unknown:
        raise ConfigError(f"{origin}: 'arms' names {unknown}, not arms of this sweep ({', '.join(arms)})")
    return content, per_arm


@dataclass(frozen=True)
class Space:
    """Where a search draws one key's values: loguniform, uniform or intuniform over [low, high], or choice."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    options: tuple[str, ...] = ()

    @staticmethod
    def parse(key: str, text: object, origin: str) -> "Space":
        if isinstance(text, list):
            return Space("choice", options=tuple(str(v) for v in text))
        match = re.fullmatch(r"\s*(loguniform|uniform|intuniform|choice)\((.*)\)\s*", str(text))
        args = [a.strip() for a in match.group(2).split(",") if a.strip()] if match else []
        if match and match.group(1) == "choice" and args:
            return Space("choice", options=tuple(args))
        try:
            low, high = (float(a) for a in args)
        except ValueError:
            low = high = math.nan
        if not match or not low < high or (match.group(1) == "loguniform" and low <= 0):
            raise ConfigError(f"{origin}: {key}: {text!r} is not loguniform(low, high) (0 < low < high), "
                              f"uniform(low, high), intuniform(low, high) or choice(a, b, ...) (inside YAML's "
                              f"{{key: value}} quote it: its comma would end the value)")
        return Space(match.group(1), low, high)

    def value(self, u: float) -> str:
        """The value at quantile u in [0, 1) of this space, as the override's text."""
        if self.kind == "choice":
            return self.options[min(int(u * len(self.options)), len(self.options) - 1)]
        if self.kind == "intuniform":
            return str(min(int(self.low + u * (self.high - self.low + 1)), int(self.high)))
        if self.kind == "loguniform":
            x = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            x = self.low + u * (self.high - self.low)
        return f"{float(f'{x:.3g}'):g}"


@dataclass(frozen=True)
class Search:
    """A sweep's search: its spaces (for every arm, and per arm), trials an arm, and its own seed."""

    space: dict[str, Space]
    per_arm: dict[str, dict[str, Space]]
    trials: int = 0
    seed: int = 0

    @staticmethod
    def of(content: object, origin: str, arms: list[str]) -> "Search | None":
        if content is None:
            return None
        content, per_arm = split_per_arm(content, origin, arms)
        if not isinstance(content, dict):
            raise ConfigError(f"{origin}: 'search' holds trials, seed, space and arms (see launch/trials.py)")
        unknown = set(content) - {"trials", "seed", "space"}
        if unknown:
            raise ConfigError(f"{origin}: search: unknown key(s) {sorted(unknown)} (known: trials, seed, space, arms)")
        spaces = {str(k): Space.parse(str(k), v, origin) for k, v in (content.get("space") or {}).items()}
        arm_spaces = {arm: {str(k): Space.parse(str(k), v, origin) for k, v in (keys or {}).items()}
                      for arm, keys in per_arm.items()}
        if not spaces and not any(arm_spaces.values()):
            raise ConfigError(f"{origin}: search: give a space (section.key: loguniform(low, high), ...)")
        check_varied(set(spaces).union(*arm_spaces.values()), origin)
        equal_keys({arm: set(spaces) | set(arm_spaces.get(arm, {})) for arm in arms}, origin, "searches")
        return Search(spaces, arm_spaces, int(content.get("trials") or 0), int(content.get("seed") or 0))

    @property
    def keys(self) -> set[str]:
        """Every key it varies, for any arm."""
        return set(self.space).union(*self.per_arm.values())

    def draws(self, arm: str, count: int) -> list[dict[str, str]]:
        """The arm's first `count` trials: its spaces' values at quantiles drawn per (seed, trial, key)."""
        spaces = {**self.space, **self.per_arm.get(arm, {})}
        return [{key: space.value(float(np.random.default_rng(
            derive_seed(self.seed, "search", i, zlib.crc32(key.encode()))).random()))
            for key, space in spaces.items()} for i in range(count)]


def arm_trials(arms: list[str], grid: dict[str, list[str]], grid_per_arm: dict[str, dict[str, list[str]]],
               search: Search | None, count: int) -> dict[str, list[dict[str, str]]]:
    """Each arm's trials: every combination of its grid (the sweep's, with its own keys replacing or added),
    times `count` draws of the search (none: the grid alone). Every arm must get the same number."""
    found = {}
    for arm in arms:
        points = expand({**grid, **grid_per_arm.get(arm, {})})
        draws = search.draws(arm, count) if search and count else [{}]
        clash = sorted(set(points[0]) & set(draws[0]))
        if clash:
            raise ConfigError(f"{', '.join(clash)}: both in the grid and in the search; give it in one place")
        combined = [{**point, **draw} for point in points for draw in draws]
        names = [trial_name(c) for c in combined]
        if len(set(names)) != len(names):
            raise ConfigError(f"{arm}: two trials would share a folder name ({_first_repeat(names)}): the search "
                              f"drew one setting twice; widen its space or use fewer trials")
        found[arm] = combined
    counts = {arm: len(t) for arm, t in found.items()}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"the arms would get different numbers of trials ({counts}): a comparison at unequal "
                          f"tuning budgets favours the arm tuned more; give each arm's grid as many points")
    return found


def _first_repeat(names: list[str]) -> str:
    return next(n for i, n in enumerate(names) if n in names[:i])


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
