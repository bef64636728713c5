"""Trials: the settings of the keys that are not the arm, one run folder each. An arm is what the
comparison is about (depth x initialisation); a trial is one point of a grid over other keys (a learning
rate, an image size, a head); a run is (arm, trial, seed). Torch-free: the sweep expands trials, names
them and checks them before anything is submitted.

A grid trial's name is made from its keys' last parts and values, in key order (`lr0.05-image_size384`):
the user gave those values exactly. A name too long is shortened with a hash.

A search draws its trials instead of listing them: `loguniform(lo, hi)` (rates), `uniform(lo, hi)`,
`intuniform(lo, hi)` or `choice(a, b, ...)` per key. Trial i of every arm is point i of one scrambled Sobol
sequence (seeded by the search's own seed), one dimension per searched key, the keys in name order:
- every arm gets the same quantiles (common random numbers: two arms searching one range get the same values;
  an arm's own range maps the same quantile through that range), so their difference is not one of luck;
- a larger trial count keeps the earlier points (a prefix of the sequence): finished folders are not run again;
- 2^k trials put one point in each 2^-k-th of every key's range: 8 trials cover every quarter of a log range.
Adding, removing or renaming a searched key changes the number of dimensions, and the scrambling with it: the
points of every dimension change (all but the first). So does another scipy's scrambling. The launcher records
the drawn values in the sweep's manifest and refuses a rerun that would give a recorded trial other values.
A discrete space (choice and intuniform keys only) with fewer settings than trials repeats whole settings:
each repeat is a trial folder of its own (another run of the same settings) and counts as a trial in the
best-of-k curve; the launcher warns, and the manifest says so (`search_record`).

A drawn trial's override holds the exact value (the float's repr: phase 2 reruns exactly what won); its name
is `t<index>-` and the values rounded to 3 significant digits for reading (`t03-lr0.00104`), so two trials
never share a folder, whatever their values round to.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal

from dr_resnet.config import NOT_SEARCHED, ConfigError

MAX_NAME = 60  # characters of a trial's folder name before it is shortened with a hash
SHOWN_DIGITS = 3  # significant digits of a drawn value in a trial's name (the override keeps every digit)


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
        if match.group(1) == "intuniform" and not (low.is_integer() and high.is_integer()):
            raise ConfigError(f"{origin}: {key}: {text!r}: intuniform takes whole-number bounds (both inclusive)")
        return Space(match.group(1), low, high)

    @property
    def near_one(self) -> bool:
        """A uniform range closer to 1 than it is wide (an EMA decay, a momentum): drawn and rounded in 1 - x.
        Linear in 1 - x, not log: the draw stays the uniform the user asked for; only the rounding for the name
        moves, to the digits that differ (0.999127, never 1)."""
        return self.kind == "uniform" and 0 < self.low < self.high < 1 and 1 - self.high < self.high - self.low

    @property
    def size(self) -> int | None:
        """How many distinct values it has (None: continuous)."""
        if self.kind == "choice":
            return len(self.options)
        return int(self.high - self.low) + 1 if self.kind == "intuniform" else None

    def value(self, u: float) -> tuple[str, str]:
        """The value at quantile u in [0, 1): (the override's exact text, the text its trial's name shows)."""
        if self.kind == "choice":
            option = self.options[min(math.floor(u * len(self.options)), len(self.options) - 1)]
            return option, option
        if self.kind == "intuniform":  # floor over [low, high + 1): each whole number equally likely, both ends
            whole = str(min(int(self.low) + math.floor(u * (self.high - self.low + 1)), int(self.high)))
            return whole, whole
        if self.near_one:
            gap = (1 - self.low) - u * (self.high - self.low)  # 1 - x, so that x never rounds to 1
            exact = min(max(1 - gap, self.low), self.high)
            low_gap, high_gap = 1 - Decimal(repr(self.high)), 1 - Decimal(repr(self.low))
            shown = 1 - min(max(Decimal(f"{gap:.{SHOWN_DIGITS}g}"), low_gap), high_gap)
            return repr(exact), format(shown.normalize(), "f")
        if self.kind == "loguniform":
            x = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            x = self.low + u * (self.high - self.low)
        exact = min(max(x, self.low), self.high)  # exp(log(...)) may step a hair past an end
        shown = min(max(float(f"{exact:.{SHOWN_DIGITS}g}"), self.low), self.high)  # never rounded out of the range
        return repr(exact), f"{shown:g}" if float(f"{shown:g}") == shown else repr(shown)


@dataclass(frozen=True)
class Draw:
    """One drawn trial of an arm: its index in the sequence, exact override values and the values its name shows."""

    index: int
    values: dict[str, str]
    shown: dict[str, str]


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
    def keys(self) -> list[str]:
        """Every key it varies, for any arm, in name order: one Sobol dimension each."""
        return sorted(set(self.space).union(*self.per_arm.values()))

    def spaces(self, arm: str) -> dict[str, Space]:
        """The arm's space per key (its own range where it has one), in name order."""
        mine = {**self.space, **self.per_arm.get(arm, {})}
        return {key: mine[key] for key in sorted(mine)}

    def quantiles(self, count: int) -> list[list[float]]:
        """The first `count` points of the search's scrambled Sobol sequence, one coordinate per key."""
        from scipy.stats import qmc  # only a search needs scipy

        if count < 1:
            return []
        # random_base2 draws 2^m points, the first `count` of which are any shorter draw's (a Sobol prefix);
        # random(count) would say the same points and warn that count is not a power of 2
        points = qmc.Sobol(len(self.keys), scramble=True, seed=self.seed).random_base2(max(0, (count - 1).bit_length()))
        return points[:count].tolist()

    def draws(self, arm: str, count: int) -> list[Draw]:
        """The arm's first `count` trials: point i of the sequence through the arm's spaces."""
        spaces, keys = self.spaces(arm), self.keys
        found = []
        for index, point in enumerate(self.quantiles(count)):
            pairs = {key: space.value(point[keys.index(key)]) for key, space in spaces.items()}
            found.append(Draw(index, {k: v[0] for k, v in pairs.items()}, {k: v[1] for k, v in pairs.items()}))
        return found

    def distinct_configurations(self, arm: str) -> int | None:
        """How many distinct settings the arm's space holds (None: a continuous key makes it endless)."""
        sizes = [space.size for space in self.spaces(arm).values()]
        return None if None in sizes else math.prod(sizes)


def arm_trials(arms: list[str], grid: dict[str, list[str]], grid_per_arm: dict[str, dict[str, list[str]]],
               search: Search | None, count: int) -> dict[str, dict[str, dict[str, str]]]:
    """Each arm's trials (trial name -> exact values): every combination of its grid (the sweep's, with its own
    keys replacing or added), times `count` draws of the search (none: the grid alone). Every arm must get the
    same number."""
    found = {}
    for arm in arms:
        points = expand({**grid, **grid_per_arm.get(arm, {})})
        draws = search.draws(arm, count) if search and count else []
        clash = sorted(set(points[0]) & set(draws[0].values)) if draws else []
        if clash:
            raise ConfigError(f"{', '.join(clash)}: both in the grid and in the search; give it in one place")
        combined = {}
        for point in points:
            if not draws:
                combined[trial_name(point)] = point
            for draw in draws:
                combined[trial_name({**point, **draw.shown}, draw.index)] = {**point, **draw.values}
        if len(combined) != len(points) * max(1, len(draws)):  # a hash of 8 hex digits would have to collide
            raise ConfigError(f"{arm}: two trials would share a folder name: shorten the searched keys' names")
        found[arm] = combined
    counts = {arm: len(t) for arm, t in found.items()}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"the arms would get different numbers of trials ({counts}): a comparison at unequal "
                          f"tuning budgets favours the arm tuned more; give each arm's grid as many points")
    return found


def expand(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values, keys in their given order, values in theirs ([{}] without a
    grid: one trial, the arm's own settings)."""
    keys = list(grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    names = [trial_name(c) for c in combos]
    if len(set(names)) != len(names):
        raise ConfigError(f"grid {grid}: two trials would share a folder name; give each key distinct values")
    return combos


def trial_name(values: dict[str, str], index: int | None = None) -> str:
    """A trial's folder name: '' for no trial, else `t<index>-` (a drawn trial) and its keys' last parts with
    their values (rounded, for a drawn one)."""
    if not values and index is None:
        return ""
    parts = ([f"t{index:02d}"] if index is not None else []) + [
        f"{key.rsplit('.', 1)[-1]}{_safe(value)}" for key, value in values.items()]
    name = "-".join(parts)
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(json.dumps([index, values], sort_keys=True).encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 9]}-{digest}"
    return name


def _safe(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", value)


def overrides_of(values: dict[str, str]) -> list[str]:
    return [f"{key}={value}" for key, value in values.items()]


# -- searched keys and factors ----------------------------------------------------------------------------

def roles(gridded: set[str], search_keys: list[str], named: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """(searched, factors), each sorted: a search's keys and the grid keys `named` (origin -> keys) are tuned;
    every other grid key is a factor of the experiment, reported at every value and never chosen."""
    for origin, keys in named.items():
        for key in keys:
            if key not in gridded:
                varied = ", ".join(sorted(gridded)) or "nothing"
                raise ConfigError(f"{origin}: {key} is not a grid key (the grid varies {varied}): name only grid keys "
                                  f"there (search: keys are searched already)")
    searched = set(search_keys) | {key for keys in named.values() for key in keys}
    return sorted(searched), sorted(gridded - searched)


def untuned_warning(searched: list[str]) -> str:
    """The warning for searched keys run without --tune ('' when there are none)."""
    if not searched:
        return ""
    return (f"warning: {', '.join(searched)} searched without --tune: choosing among its values on the same seeds that "
            f"are then compared on test favours the noisier arm; use --tune (phase 1 chooses on held-out figures, phase 2 "
            f"runs the choice on fresh seeds)")


# -- the drawn values on record ---------------------------------------------------------------------------

def search_record(search: Search, arms: list[str], count: int) -> dict:
    """What a manifest keeps of a search: its seed and keys, each arm's drawn values per trial (`t<index>`), and
    whether whole configurations repeat (a discrete space smaller than the trials: each repeat is a trial folder
    of its own, an independent run with the same settings, and counts as a trial in the best-of-k curve)."""
    draws = {arm: search.draws(arm, count) for arm in arms}
    distinct = {arm: search.distinct_configurations(arm) for arm in arms}
    repeats = {arm: count - len({json.dumps(d.values, sort_keys=True) for d in draws[arm]}) for arm in arms}
    return {"seed": search.seed, "keys": search.keys, "trials": count,
            "draws": {arm: {f"t{d.index:02d}": d.values for d in found} for arm, found in draws.items()},
            "distinct_configurations": distinct, "repeats": any(repeats.values()),
            "repeated_trials": {arm: n for arm, n in repeats.items() if n}}


def repeat_warnings(record: dict) -> list[str]:
    """One line per arm whose draws repeat a whole configuration."""
    return [f"warning: {arm}: {record['trials']} trials over {record['distinct_configurations'][arm] or 'more'} distinct "
            f"configurations of its discrete search: {n} repeat an earlier trial's settings; each repeat is its own "
            f"trial folder (an independent run with the same settings) and counts as a trial in the best-of-k curve"
            for arm, n in record["repeated_trials"].items()]


def check_recorded(recorded: dict, current: dict, manifest: str) -> None:
    """Refuse draws that give a trial on record (an earlier launch's manifest) other values than it ran with."""
    for arm, trials in (recorded.get("draws") or {}).items():
        now = current["draws"].get(arm, {})
        for trial in sorted(set(trials) & set(now)):
            was, will = trials[trial], now[trial]
            for key in sorted(set(was) | set(will)):
                if was.get(key) != will.get(key):
                    raise ConfigError(f"{manifest}: trial {trial} of {arm} ran with {key}={was.get(key, '(not searched)')}, "
                                      f"the search now draws {will.get(key, '(not searched)')}: its seed or keys changed; "
                                      f"put them back, or give this search another --out")


def merged_record(recorded: dict | None, current: dict) -> dict:
    """The current record, keeping any trial on record beyond its count (a rerun with fewer trials)."""
    if not recorded:
        return current
    draws = {arm: {**trials, **current["draws"].get(arm, {})} for arm, trials in (recorded.get("draws") or {}).items()}
    return {**current, "draws": {**draws, **{a: t for a, t in current["draws"].items() if a not in draws}}}
