"""Tuning at equal budgets: search draws, the held-out winner rule, the expected-best estimator, nested
training fractions and the stretched schedule; and (slow) the two-phase sweep, run and resumed for real."""

import importlib.util
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from dr_resnet import config
from dr_resnet.config import ConfigError
from dr_resnet.data.split import holdout_mask, nested_share
from dr_resnet.results import tuning
from launch import trials

REPO = Path(__file__).resolve().parents[1]


# -- the expected best of k trials --------------------------------------------------------------------

@pytest.mark.parametrize("values", [[0.3, 0.7, -math.inf, 0.5, 0.9, -math.inf],  # N=6, 2 failed
                                    [0.2, -math.inf, 0.2, 0.6, -math.inf, -math.inf, 0.4],  # ties, 3 of 7 failed
                                    [-math.inf, -math.inf, 0.5]])  # mostly failed: the median is "failed" at k=1
def test_median_best_of_k_and_all_failed_chance_equal_brute_force_over_every_subset(values):
    n = len(values)
    curve = tuning.best_of_k_curve(values)
    assert [c["k"] for c in curve] == list(range(1, n + 1))
    for point in curve:
        subsets = list(itertools.combinations(values, point["k"]))
        median = np.median([max(s) for s in subsets])  # a failure is -inf: below every finished trial
        assert point["median"] == (pytest.approx(median, abs=1e-12) if math.isfinite(median) else None)
        assert point["all_failed"] == pytest.approx(np.mean([max(s) == -math.inf for s in subsets]), abs=1e-12)
        assert point["low"] is None or point["median"] is None or point["low"] <= point["high"]
    assert curve[-1]["median"] == max(values) and curve[-1]["all_failed"] == 0  # k = N: the observed best
    assert curve == tuning.best_of_k_curve(values)  # the band is seeded
    assert (curve[-1]["low"] or -1) < curve[-1]["high"] == max(values)  # at k = N the band is still a band


def test_ranking_note_describes_the_order_or_a_tie_and_names_no_better_arm():
    curves = {"a": tuning.best_of_k_curve([0.5, 0.5, 0.5]), "b": tuning.best_of_k_curve([0.1, 0.2, 0.9])}
    assert tuning.ranking_at(curves, 1) == [["a"], ["b"]] and tuning.ranking_at(curves, 3) == [["b"], ["a"]]
    note = tuning.ranking_note(curves)
    assert "k=1: a (0.500) > b (0.200)" in note and "k=3: b (0.900) > a (0.500)" in note
    assert "better" not in note and "verdict" not in note
    same = {"a": tuning.best_of_k_curve([0.0, 0.0, 0.0]), "b": tuning.best_of_k_curve([0.0, 0.0, 0.0])}
    assert tuning.ranking_at(same, 3) == [["a", "b"]] and "k=3: tie (a, b: 0.000)" in tuning.ranking_note(same)
    failed = {"a": tuning.best_of_k_curve([-math.inf] * 3), "b": tuning.best_of_k_curve([-math.inf, -math.inf, 0.4])}
    assert "k=1: tie (a, b: failed)" in tuning.ranking_note(failed)


def test_a_nan_held_out_epoch_is_never_selected():
    from dr_resnet.results.rundir import selectable, selected_row

    def row(epoch: int, qwk: float, loss: float = 1.0) -> dict:
        return {"epoch": epoch, "val_qwk": qwk, "val_acc": 0.5, "val_loss": loss}

    nan, inf = math.nan, math.inf
    # A NaN first epoch used to win every comparison after it (NaN compares false both ways).
    assert selected_row([row(1, nan), row(2, 0.3), row(3, nan), row(4, 0.5)], "qwk")["epoch"] == 4
    assert selected_row([row(1, 0.2), row(2, nan)], "qwk")["epoch"] == 1
    assert selected_row([row(1, 0, nan), row(2, 0, inf), row(3, 0, 5.0)], "loss")["epoch"] == 3
    every = selected_row([row(1, nan), row(2, nan)], "qwk")  # nothing finite: the first, and it says so
    assert every["epoch"] == 1 and not selectable(every, "qwk")


# -- search draws and equal budgets ------------------------------------------------------------------

def search(content: dict, arms=("r18", "r50")) -> trials.Search:
    return trials.Search.of(content, "sweep.yaml: search", list(arms))


def test_search_draws_are_stable_equal_per_arm_and_keep_earlier_trials():
    content = {"seed": 3, "space": {"train.lr": "loguniform(0.01, 1.0)", "model.head": "choice(classification, regression)",
                                    "train.weight_decay": "uniform(0, 0.001)", "data.image_size": "intuniform(64, 128)"},
               "arms": {"r50": {"train.lr": "loguniform(0.001, 0.1)"}}}
    s = search(content)
    six = trials.arm_trials(["r18", "r50"], {}, {}, s, 6)
    assert len(six["r18"]) == len(six["r50"]) == 6
    assert six == trials.arm_trials(["r18", "r50"], {}, {}, search(content), 6)  # stable: a pure function of the file
    assert list(trials.arm_trials(["r18", "r50"], {}, {}, s, 9)["r18"].items())[:6] == list(six["r18"].items())
    for a, b in zip(six["r18"].values(), six["r50"].values()):  # the same quantiles: r50's range is r18's divided by 10
        assert float(a["train.lr"]) == pytest.approx(10 * float(b["train.lr"]), rel=1e-9)
        assert a["model.head"] == b["model.head"] and a["data.image_size"] == b["data.image_size"]
    for name, t in six["r18"].items():  # the exact value in the override; the name shows it rounded
        assert 0.01 <= float(t["train.lr"]) <= 1.0 and t["train.lr"] == repr(float(t["train.lr"]))
        assert f"-lr{float(t['train.lr']):.3g}-" in name + "-" or float(t["train.lr"]) > 0.9995
        assert 64 <= int(t["data.image_size"]) <= 128 and t["model.head"] in ("classification", "regression")
    assert [n[:4] for n in six["r18"]] == ["t00-", "t01-", "t02-", "t03-", "t04-", "t05-"]
    logs = np.log10([float(d.values["train.lr"]) for d in s.draws("r18", 1024)])
    quarters = np.histogram(logs, bins=4, range=(-2, 0))[0]  # a Sobol sequence's 1024 points: 256 in each quarter
    assert quarters.tolist() == [256] * 4, quarters
    other = search({"seed": 4, "space": {"train.lr": "loguniform(0.01, 1.0)"}})
    assert other.draws("r18", 6) != search({"seed": 3, "space": {"train.lr": "loguniform(0.01, 1.0)"}}).draws("r18", 6)


SPACES = {"train.lr": "loguniform(0.005, 0.5)", "train.ema": "uniform(0.99, 0.9999)",
          "data.image_size": "intuniform(-2, 2)", "model.head": "choice(classification, regression, ordinal)"}


@pytest.mark.parametrize("count", [6, 8, 20, 50])
def test_drawn_trials_never_share_a_name_and_stay_in_their_ranges(count):
    """Names carry the trial's index, so no two collide whatever the values round to; every exact and every
    shown value lies in its range, a range near 1 never shows 1, and an intuniform draws both its ends."""
    s = search({"seed": 0, "space": SPACES})
    named = trials.arm_trials(["r18", "r50"], {}, {}, s, count)["r18"]
    draws = s.draws("r18", count)
    assert len(named) == count and [n.split("-")[0] for n in named] == [f"t{i:02d}" for i in range(count)]
    for d in draws:
        assert 0.005 <= float(d.values["train.lr"]) <= 0.5 and 0.005 <= float(d.shown["train.lr"]) <= 0.5
        assert 0.99 <= float(d.values["train.ema"]) <= 0.9999 and 0.99 <= float(d.shown["train.ema"]) <= 0.9999
        assert float(d.shown["train.ema"]) < 1 and d.shown["train.ema"] != "1"
        assert d.values["data.image_size"] == d.shown["data.image_size"] and -2 <= int(d.values["data.image_size"]) <= 2
        assert d.values["model.head"] in ("classification", "regression", "ordinal")
    if count >= 8:  # 8 points: one in each eighth of every key's range
        assert {int(d.values["data.image_size"]) for d in draws} >= {-2, 2}
        assert {d.values["model.head"] for d in draws} == {"classification", "regression", "ordinal"}
    if count == 50:
        assert len({d.values["train.ema"] for d in draws}) == 50 and len({d.shown["train.ema"] for d in draws}) >= 30


def test_a_larger_trial_count_keeps_the_smaller_counts_points():
    s = search({"seed": 7, "space": SPACES})
    assert np.array_equal(s.quantiles(50)[:5], s.quantiles(5))  # the Sobol sequence's prefix
    fifty = trials.arm_trials(["r18"], {}, {}, s, 50)["r18"]
    for n in (1, 6, 8, 20):
        assert list(trials.arm_trials(["r18"], {}, {}, s, n)["r18"].items()) == list(fifty.items())[:n]
    # a grid point x draws: each grid point keeps its own first draws too
    gridded = trials.arm_trials(["r18"], {"train.sampler": ["random", "balanced"]}, {}, search(
        {"seed": 7, "space": {"train.lr": "loguniform(0.005, 0.5)"}}), 8)["r18"]
    assert len(gridded) == 16 and all(n.startswith("t0") for n in gridded)


@pytest.mark.parametrize("others", [{}, {"data.image_size": "intuniform(64, 128)", "train.weight_decay": "uniform(0, 0.01)"}])
def test_eight_trials_cover_every_quarter_of_a_log_range_at_every_seed(others):
    for seed in range(200):
        s = search({"seed": seed, "space": {"train.lr": "loguniform(0.005, 0.5)", **others}})
        logs = np.log10([float(d.values["train.lr"]) for d in s.draws("r18", 8)])
        quarters = np.histogram(logs, bins=4, range=(math.log10(0.005), math.log10(0.5)))[0]
        assert quarters.min() >= 1, (seed, quarters)


def test_a_discrete_space_smaller_than_the_trials_repeats_and_says_so(tmp_path, capsys):
    from launch.sweep import main

    s = search({"seed": 0, "space": {"model.head": "choice(classification, regression)", "data.image_size": "intuniform(1, 2)"}})
    record = trials.search_record(s, ["r18", "r50"], 6)
    assert record["distinct_configurations"] == {"r18": 4, "r50": 4} and record["repeats"] is True
    assert record["repeated_trials"] == {"r18": 2, "r50": 2} and list(record["draws"]["r18"]) == [f"t0{i}" for i in range(6)]
    assert trials.search_record(search({"space": {"train.lr": "uniform(0.1, 1)"}}), ["r18"], 6)["repeats"] is False
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "d", "config": str(REPO / "configs" / "demo.yaml"),
                                          "arms": {"r18": ["model.depth=18", "model.weights=none"]},
                                          "search": {"trials": 3, "space": {"model.head": ["classification", "regression"]}}}))
    assert main(["--config", str(sweep_file), "--out", str(tmp_path / "o"), "--print-config"]) == 0
    captured = capsys.readouterr()
    assert "warning: r18: 3 trials over 2 distinct configurations" in captured.err and "counts as a trial" in captured.err
    assert len([d for d in yaml.safe_load_all(captured.out) if d]) == 3  # each repeat its own trial folder


def test_the_manifest_records_the_draws_and_a_changed_search_is_refused(tmp_path, capsys, monkeypatch):
    """The manifest keeps each trial's exact values; a rerun whose search would give a recorded trial other
    values (another seed, another key) is refused, naming the trial and the key; more trials extend it."""
    from launch import sweep

    monkeypatch.setattr(sweep, "make_executor", lambda *a, **k: None)  # submit nothing: the manifest is the point
    monkeypatch.setattr(sweep, "submit_each", lambda *a, **k: iter(()))
    sweep_file, out = tmp_path / "sweep.yaml", tmp_path / "out"

    def launch(count: int, seed: int = 1, **space) -> int:
        sweep_file.write_text(yaml.safe_dump({"name": "m", "config": str(REPO / "configs" / "demo.yaml"),
                                              "arms": {"r18": ["model.depth=18", "model.weights=none"]},
                                              "search": {"trials": count, "seed": seed,
                                                         "space": {"train.lr": "loguniform(0.005, 0.5)", **space}}}))
        return sweep.main(["--config", str(sweep_file), "--out", str(out)])

    assert launch(4) == 0
    recorded = json.loads((out / "sweep.json").read_text())["search"]
    assert recorded["seed"] == 1 and recorded["keys"] == ["train.lr"] and len(recorded["draws"]["r18"]) == 4
    for trial, values in recorded["draws"]["r18"].items():  # the exact value each run's config got
        folder = next((out / "r18").glob(f"{trial}-*"))
        assert str(yaml.safe_load((folder / "config.yaml").read_text())["train"]["lr"]) == values["train.lr"]
    assert launch(4) == 0 and launch(8) == 0  # the same search, and more of it: the first four are unchanged
    assert len(json.loads((out / "sweep.json").read_text())["search"]["draws"]["r18"]) == 8
    capsys.readouterr()
    assert launch(8, seed=2) == 2
    assert "trial t00 of r18 ran with train.lr=" in capsys.readouterr().err
    assert launch(8, **{"train.weight_decay": "uniform(0, 0.001)"}) == 2  # a key more: every dimension re-scrambled
    err = capsys.readouterr().err
    assert "trial t00 of r18 ran with train.weight_decay=(not searched)" in err and "seed or keys changed" in err
    assert launch(2) == 0  # fewer trials: the record keeps the others
    assert len(json.loads((out / "sweep.json").read_text())["search"]["draws"]["r18"]) == 8


def test_keys_that_decide_the_held_out_score_or_the_arm_are_never_varied(tmp_path, capsys):
    from launch.sweep import main

    with pytest.raises(ConfigError, match="--grid: model.depth may not be varied by a grid or search: it decides the arm"):
        trials.parse_grid(["model.depth=18,50"])
    for key in ("train.select_by", "data.val_fraction", "data.split_seed", "data.val_split", "regression.fit_thresholds",
                "train.calibration", "model.weights"):
        with pytest.raises(ConfigError, match=f"search: {key} may not be varied"):
            search({"space": {"train.lr": "uniform(0.1, 1)", key: "choice(a, b)"}})
        with pytest.raises(ConfigError, match=f"{key} may not be varied"):
            trials.grid_of({key: ["a", "b"]}, "sweep.yaml: grid")
    with pytest.raises(ConfigError, match="data.val_fraction may not be varied"):  # an arm's own block too
        search({"space": {"train.lr": "uniform(0.1, 1)"}, "arms": {"r18": {"data.val_fraction": "uniform(0.1, 0.2)"},
                                                                   "r50": {"data.val_fraction": "uniform(0.1, 0.2)"}}})
    assert main(["--config", str(REPO / "configs" / "demo_sweep.yaml"), "--grid", "model.depth=18,50", "--print-config"]) == 2
    assert "model.depth may not be varied" in capsys.readouterr().err


def test_every_arm_searches_and_grids_the_same_keys(tmp_path):
    from launch.sweep import Sweep

    with pytest.raises(ConfigError, match="arm r18 searches no train.weight_decay, arm r50 does: equal budgets"):
        search({"space": {"train.lr": "loguniform(0.01, 1)"}, "arms": {"r50": {"train.weight_decay": "uniform(0, 0.01)"}}})
    both = search({"space": {"train.lr": "loguniform(0.01, 1)"},  # ranges per arm may differ: the keys may not
                   "arms": {"r18": {"train.weight_decay": "uniform(0, 0.01)"}, "r50": {"train.weight_decay": "uniform(0, 0.1)"}}})
    assert sorted(both.keys) == ["train.lr", "train.weight_decay"]
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "g", "config": str(REPO / "configs" / "demo.yaml"),
                                          "arms": {"r18": ["model.depth=18"], "r50": ["model.depth=50"]},
                                          "grid": {"train.lr": [0.1, 0.2], "arms": {"r50": {"data.image_size": [64, 96]}}}}))
    with pytest.raises(ConfigError, match="arm r18 varies no data.image_size, arm r50 does"):
        Sweep.load(sweep_file)


def test_unequal_budgets_and_bad_spaces_are_refused():
    with pytest.raises(ConfigError, match="different numbers of trials"):
        trials.arm_trials(["r18", "r50"], {"train.lr": ["0.1", "0.2"]}, {"r50": {"train.lr": ["0.01", "0.02", "0.03"]}},
                          None, 0)
    same = trials.arm_trials(["r18", "r50"], {"train.lr": ["0.1", "0.2"]}, {"r50": {"train.lr": ["0.01", "0.02"]}}, None, 0)
    assert [t["train.lr"] for t in same["r50"].values()] == ["0.01", "0.02"] and list(same["r50"]) == ["lr0.01", "lr0.02"]
    for bad in ("loguniform(0, 1)", "uniform(1, 0.5)", "normal(0, 1)", "loguniform(0.1)", "intuniform(0.5, 3)"):
        with pytest.raises(ConfigError, match="train.lr"):
            search({"space": {"train.lr": bad}})
    with pytest.raises(ConfigError, match="not arms of this sweep"):
        search({"space": {"train.lr": "uniform(0, 1)"}, "arms": {"r34": {}}})
    with pytest.raises(ConfigError, match="both in the grid and in the search"):
        trials.arm_trials(["r18"], {"train.lr": ["0.1"]}, {}, search({"space": {"train.lr": "uniform(0.1, 1)"}}), 2)


# -- the winner: held-out figures only ------------------------------------------------------------------

def write_trial(folder: Path, val_qwk: list[float], test_qwk: list[float], lr: str, epochs: int | None = None,
                val_cm: list | None = None, status: str = "") -> None:
    """A trial's run folder: its config and metrics log (val_cm: every epoch's held-out confusion matrix;
    status: the launcher's word, launch_status.json)."""
    folder.mkdir(parents=True)
    cfg = config.load(REPO / "configs" / "demo.yaml", [f"train.lr={lr}", f"train.epochs={epochs or len(val_qwk)}",
                                                      "train.warmup_epochs=0", f"output.dir={folder}"])
    config.save(cfg, folder / "config.yaml")
    rows = [{"epoch": e + 1, "val_qwk": v, "val_acc": 0.5, "val_loss": 1.0, "test_qwk": t, "test_acc": 0.5,
             "test_loss": 1.0, "confusion_matrix": np.eye(5, dtype=int).tolist(),
             **({"val_confusion_matrix": val_cm} if val_cm is not None else {})}
            for e, (v, t) in enumerate(zip(val_qwk, test_qwk))]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status:
        (folder / "launch_status.json").write_text(json.dumps({"status": status.split(": ")[0],
                                                               "reason": status.split(": ", 1)[1]}))


def test_the_winner_is_the_held_out_best_where_the_test_split_says_otherwise(tmp_path):
    tune = tmp_path / "tune"
    write_trial(tune / "r18" / "lr0.1", [0.50, 0.70, 0.60], [0.90, 0.95, 0.99], "0.1")  # test's favourite
    write_trial(tune / "r18" / "lr0.3", [0.60, 0.80, 0.75], [0.30, 0.40, 0.35], "0.3")  # held-out best (epoch 2)
    write_trial(tune / "r18" / "lr1", [0.90], [0.99], "1", epochs=3)  # still going: not a candidate
    write_trial(tune / "r50" / "lr0.1", [0.40, 0.45], [0.10, 0.20], "0.1")
    choice = tuning.choose(tune, {"r18": {"lr0.1": {"train.lr": "0.1"}, "lr0.3": {"train.lr": "0.3"},
                                          "lr1": {"train.lr": "1"}},
                                  "r50": {"lr0.1": {"train.lr": "0.1"}, "lr0.3": {"train.lr": "0.3"}}})
    r18, r50 = choice["arms"]["r18"], choice["arms"]["r50"]
    assert r18["winner"] == {"trial": "lr0.3", "values": {"train.lr": 0.3}, "held_out": 0.80, "epoch": 2,
                             "run_dir": str(tune / "r18" / "lr0.3"), "collapsed": "",
                             "collapsed_on": "test (no held-out confusion matrix logged)", "tie": False}
    assert [t["status"] for t in r18["trials"]] == ["finished", "finished", "not finished"] and r18["finished"] == 2
    assert r18["to_rerun"] == ["lr1"] and not r18["complete"] and r18["planned"] == 3
    assert r50["winner"]["trial"] == "lr0.1" and r50["trials"][1]["status"] == "not finished"
    assert r18["metric"] == "held-out qwk"
    # The rule sees no test figure: with every test figure gone, the same winner.
    rows = [json.loads(line) for line in (tune / "r18" / "lr0.1" / "metrics.jsonl").read_text().splitlines()]
    assert all(not k.startswith("test_") and k != "confusion_matrix" for r in tuning.held_out_view(rows) for k in r)
    write_trial(tmp_path / "none" / "r18" / "lr0.1", [0.5], [0.9], "0.1")
    lines = (tmp_path / "none" / "r18" / "lr0.1" / "metrics.jsonl").read_text().replace('"val_qwk": 0.5, ', "")
    (tmp_path / "none" / "r18" / "lr0.1" / "metrics.jsonl").write_text(lines.replace('"val_acc": 0.5, "val_loss": 1.0, ', ""))
    nothing = tuning.choose(tmp_path / "none", {"r18": {"lr0.1": {"train.lr": "0.1"}}})["arms"]["r18"]
    assert "winner" not in nothing and "no held-out part" in nothing["trials"][0]["status"]


def failing_arm(tune: Path) -> dict:
    """Arm r18: 7 planned trials: 4 finished (one with a NaN first epoch), 1 failed, 1 diverged, 1 never
    started (to rerun)."""
    nan = math.nan
    write_trial(tune / "r18" / "lr0.01", [0.50, 0.60], [0.9, 0.9], "0.01")
    write_trial(tune / "r18" / "lr0.02", [nan, 0.40], [0.9, 0.9], "0.02")  # NaN at epoch 1: epoch 2 is selected
    write_trial(tune / "r18" / "lr0.5", [nan, nan], [0.9, 0.9], "0.5")  # every held-out epoch NaN: diverged
    write_trial(tune / "r18" / "lr1", [0.95], [0.9], "1", epochs=2, status="failed: job 7: NonFiniteError: loss nan")
    write_trial(tune / "r18" / "lr0.05", [0.70, 0.65], [0.1, 0.1], "0.05")
    write_trial(tune / "r18" / "lr0.1", [0.30, 0.20], [0.9, 0.9], "0.1")
    names = ["lr0.01", "lr0.02", "lr0.5", "lr1", "lr0.05", "lr0.1", "lr2"]
    return tuning.choose(tune, {"r18": {n: {"train.lr": n.removeprefix("lr")} for n in names}})


def test_failed_diverged_and_nan_trials_count_below_every_finished_one(tmp_path):
    choice = failing_arm(tmp_path / "tune")
    r18 = choice["arms"]["r18"]
    status = {t["trial"]: t["status"] for t in r18["trials"]}
    assert status == {"lr0.01": "finished", "lr0.02": "finished", "lr0.5": "diverged", "lr1": "failed",
                      "lr0.05": "finished", "lr0.1": "finished", "lr2": "not finished"}
    assert (r18["planned"], r18["finished"], r18["failed"], r18["diverged"], r18["to_rerun"], r18["complete"]) == \
        (7, 4, 1, 1, ["lr2"], False)
    nan_first = next(t for t in r18["trials"] if t["trial"] == "lr0.02")
    assert (nan_first["epoch"], nan_first["held_out"]) == (2, 0.40)  # the NaN epoch is never the selected one
    failed = next(t for t in r18["trials"] if t["trial"] == "lr1")
    assert "score" not in failed and "NonFiniteError" in failed["reason"]  # no fake worst score
    assert r18["winner"]["trial"] == "lr0.05" and r18["winner"]["epoch"] == 1  # never the failed trial's 0.95
    json.dumps(choice, allow_nan=False)  # tuning.json stays valid JSON: no NaN in it
    # N = 6 (the trial to rerun waits): the failures lower the curve; the finished trials alone flatter the arm.
    curve = tuning.curves_of(choice)["r18"]
    finished = [t["score"] for t in r18["trials"] if t["status"] == "finished"]
    assert len(curve) == 6 and curve[-1]["median"] == max(finished) == 0.70
    assert curve[0]["median"] < tuning.best_of_k_curve(finished)[0]["median"]
    assert curve[0]["all_failed"] == pytest.approx(2 / 6) and curve[1]["all_failed"] == pytest.approx(1 / 15)
    assert tuning.curves_of(choice)["r18"] == curve  # seeded band: the same report twice


def test_the_sweep_says_the_failures_the_trials_to_rerun_and_a_tie(tmp_path, capsys):
    from launch.sweep import say_winners

    say_winners(failing_arm(tmp_path / "tune"))
    out = capsys.readouterr().out
    assert ("r18: winner lr0.05 (held-out qwk 0.7000 at epoch 1; 4 of 7 trials finished, 1 failed, 1 diverged, 1 to "
            "rerun (lr2: N is incomplete; run the sweep again))") in out
    for lr in ("0.1", "0.3"):
        write_trial(tmp_path / "tie" / "r50" / f"lr{lr}", [0.5], [0.5], lr)
    say_winners(tuning.choose(tmp_path / "tie", {"r50": {f"lr{lr}": {"train.lr": lr} for lr in ("0.1", "0.3")}}))
    assert "r50: winner lr0.1 (held-out qwk 0.5000 at epoch 1, tie among 2 trials: the first is run;" in \
        capsys.readouterr().out


def test_ties_are_recorded_and_a_collapsed_winner_flagged_on_its_held_out_confusion_matrix(tmp_path):
    tune = tmp_path / "tune"
    grade_0 = [[20, 0, 0, 0, 0], [5, 0, 0, 0, 0], [5, 0, 0, 0, 0], [3, 0, 0, 0, 0], [2, 0, 0, 0, 0]]
    for lr in ("0.1", "0.3", "1"):  # every trial collapsed to grade 0: the same held-out QWK
        write_trial(tune / "r18" / f"lr{lr}", [0.0, 0.0], [0.5, 0.6], lr, val_cm=grade_0)
    choice = tuning.choose(tune, {"r18": {f"lr{lr}": {"train.lr": lr} for lr in ("0.1", "0.3", "1")}})
    winner = choice["arms"]["r18"]["winner"]
    assert winner["trial"] == "lr0.1" and winner["epoch"] == 1 and winner["tie"] is True
    assert winner["tied"] == ["lr0.1", "lr0.3", "lr1"]
    assert "grade 0 predicted" in winner["collapsed"] and winner["collapsed_on"] == "held-out"
    from dr_resnet.results.tables import markdown, tuning_table

    curves = tuning.curves_of(choice)
    text = "\n".join(markdown(tuning_table(choice, curves, tuning.ranking_note(curves))))
    assert "tie among 3 trials (lr0.1, lr0.3, lr1): the first, lr0.1 (train.lr=0.1), is run" in text
    assert "yes: grade 0 predicted" in text and "one tuning seed's trials resampled" in text


def test_tuning_json_keeps_values_typed_and_older_files_still_read(tmp_path):
    assert [tuning.typed(v) for v in ("0.188", "64", "true", "False", "regression", "1e-3", "nan", 0.5)] == \
        [0.188, 64, True, False, "regression", 0.001, "nan", 0.5]
    tune = tmp_path / "tune"
    write_trial(tune / "r18" / "a", [0.5], [0.5], "0.188")
    choice = tuning.choose(tune, {"r18": {"a": {"train.lr": "0.188", "data.image_size": "64", "model.head": "regression",
                                                "train.amp": "true"}}})
    (tmp_path / "tuning.json").write_text(json.dumps(choice))
    again = tuning.read_choice(tmp_path)
    values = {"train.lr": 0.188, "data.image_size": 64, "model.head": "regression", "train.amp": True}
    assert again["arms"]["r18"]["winner"]["values"] == values == again["arms"]["r18"]["trials"][0]["values"]
    assert json.loads((tmp_path / "tuning.json").read_text())["arms"]["r18"]["winner"]["values"]["train.lr"] == 0.188
    old = {"arms": {"r18": {  # before failures counted: values as text, a failure's status its launcher's word
        "trials": [{"trial": "lr0.1", "values": {"train.lr": "0.1"}, "run_dir": "x", "status": "finished",
                    "metric": "held-out qwk", "held_out": 0.5, "epoch": 2, "score": 0.5},
                   {"trial": "lr1", "values": {"train.lr": "1"}, "run_dir": "y", "status": "failed: job 3: boom"},
                   {"trial": "lr3", "values": {"train.lr": "3"}, "run_dir": "z", "status": "not finished"}],
        "finished": 1, "metric": "held-out qwk",
        "winner": {"trial": "lr0.1", "values": {"train.lr": "0.1"}, "held_out": 0.5, "epoch": 2, "run_dir": "x"}}}}
    (tmp_path / "tuning.json").write_text(json.dumps(old))
    read = tuning.read_choice(tmp_path)["arms"]["r18"]
    assert read["winner"]["values"] == {"train.lr": 0.1} and read["winner"]["tie"] is False
    assert (read["planned"], read["finished"], read["failed"], read["to_rerun"]) == (3, 1, 1, ["lr3"])
    # The old failure counts: with 1 of 2 failed, half the single trials failed, so the median at k=1 is "failed".
    assert [c["median"] for c in tuning.curves_of({"arms": {"r18": read}})["r18"]] == [None, 0.5]


def test_the_tuning_section_draws_a_slice_per_searched_key_and_the_best_of_k_curve(tmp_path):
    from dr_resnet.results.report import tuning_tables
    from dr_resnet.results.tables import markdown

    choice = failing_arm(tmp_path / "tune")
    other = tmp_path / "tune" / "r50"
    for lr, val in (("0.01", 0.4), ("0.02", 0.5), ("0.5", 0.6), ("1", 0.2), ("0.05", 0.45), ("0.1", 0.3), ("2", 0.1)):
        write_trial(other / f"lr{lr}", [val], [0.5], lr)
    choice["arms"]["r50"] = tuning.choose(tmp_path / "tune", {"r50": {f"lr{lr}": {"train.lr": lr}
                                                                      for lr in ("0.01", "0.02", "0.5", "1", "0.05",
                                                                                 "0.1", "2")}})["arms"]["r50"]
    (tmp_path / "tuning.json").write_text(json.dumps(choice))
    out = tmp_path / "out"
    out.mkdir()
    tables, written = tuning_tables(tmp_path, out)
    assert sorted(p.name for p in written) == ["expected_best.png", "slice_train_lr.png"]
    for path in written:  # drawn, not blank: coloured points and curves (palette PNGs are small in bytes)
        from PIL import Image

        pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
        assert ((pixels.max(axis=2) - pixels.min(axis=2)) > 100).sum() > 500, path.name
    text = "\n".join(markdown(tables[0]))
    assert "| r18 | 7 | 4 | 1 / 1 | 1 (lr2): N incomplete | lr0.05 (train.lr=0.05) | 0.7000 | 1 | no |" in text
    assert "all failed 33%" in text and "Median best-of-k held-out score, k=2: " in text and "better" not in text
    assert "verdicts on the arms come from the seed-level comparison of phase 2" in text


# -- learning-curve axes -----------------------------------------------------------------------------

def test_training_fractions_are_nested_whole_patient_and_keep_the_held_out_part():
    rng = np.random.default_rng(0)
    patients = [f"p{i // 2}" for i in range(400)]  # two eyes a patient
    labels = np.minimum(rng.geometric(0.5, 400) - 1, 4)
    held_out = holdout_mask(patients, labels, 0.1, seed=7)
    rest = [p for p, h in zip(patients, held_out) if not h]
    rest_labels = labels[~held_out]
    shares = {f: nested_share(rest, rest_labels, f, seed=7) for f in (0.1, 0.25, 0.5, 1.0)}
    chosen = {f: {p for p, k in zip(rest, mask) if k} for f, mask in shares.items()}
    assert chosen[0.1] < chosen[0.25] < chosen[0.5] < chosen[1.0] == set(rest)
    for mask in shares.values():  # whole patients: both eyes in, or both out
        assert all(mask[i] == mask[j] for i in range(len(rest)) for j in (i + 1,) if j < len(rest) and rest[i] == rest[j])
    n = len(set(rest))
    assert abs(len(chosen[0.25]) - 0.25 * n) <= 5  # one rounding a stratum
    assert set(np.unique(rest_labels[shares[0.1]])) == set(np.unique(rest_labels))  # every grade present
    assert (nested_share(rest, rest_labels, 0.25, seed=7) == shares[0.25]).all()
    assert not (nested_share(rest, rest_labels, 0.25, seed=8) == shares[0.25]).all()


def test_the_training_fraction_trains_on_nested_patients_with_the_same_held_out_part(tmp_path):
    from dr_resnet.training.components import datasets

    from helpers import preprocessed_dataset

    data = preprocessed_dataset(tmp_path / "d", 120, 10, seed=1, size=32)
    found = {f: datasets(config.load(REPO / "configs" / "demo.yaml", [f"data.root={data}", f"data.train_fraction={f}",
                                                                      "data.image_size=32", "data.val_fraction=0.2",
                                                                      "data.min_val_images=5"]))
             for f in (0.25, 0.5, 1.0)}
    val = {f: d.val.names for f, d in found.items()}
    assert val[0.25] == val[0.5] == val[1.0]
    train = {f: set(d.train.names) for f, d in found.items()}
    assert train[0.25] < train[0.5] < train[1.0] and not train[1.0] & set(val[1.0])
    assert abs(len({p for p in found[0.5].train.patients}) - 0.5 * len(set(found[1.0].train.patients))) <= 5


def test_train_length_stretches_epochs_and_warm_up(tmp_path):
    base = config.load(REPO / "configs" / "demo.yaml")
    twice = config.load(REPO / "configs" / "demo.yaml", ["train.length=2"])
    half = config.load(REPO / "configs" / "demo.yaml", ["train.length=0.5"])
    assert twice.train.epochs == 2 * base.train.epochs and twice.train.warmup_epochs == 2 * base.train.warmup_epochs
    assert half.train.epochs == round(base.train.epochs / 2) and half.train.warmup_epochs == base.train.warmup_epochs / 2
    assert twice.train.length == 2.0 and base.train.length == 1.0
    config.save(twice, tmp_path / "config.yaml")  # read again, a saved config trains the same epochs
    again = config.load(tmp_path / "config.yaml")
    assert (again.train.epochs, again.train.warmup_epochs) == (twice.train.epochs, twice.train.warmup_epochs)
    assert again == twice and config.from_dict(twice.to_dict()) == twice
    # the saved config keeps the epochs as given and the multiple: runs group along train.length in the report
    saved = config.settings_of(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert (saved["train.length"], saved["train.epochs"]) == (2.0, base.train.epochs)
    from dr_resnet.results.arms import read_run

    assert read_run(tmp_path).epochs_planned == twice.train.epochs
    changed = config.load(tmp_path / "config.yaml")  # changed after reading: saved as the schedule it now is
    changed.train.epochs = 3
    config.save(changed, tmp_path / "changed.yaml")
    assert config.load(tmp_path / "changed.yaml").train.epochs == 3
    with pytest.raises(ConfigError, match="train.length"):
        config.load(None, ["train.length=0"])
    # Constant-step learning curves: at a quarter of the data, four times the epochs (and warm-up), so the
    # optimizer takes as many steps as at the whole; the saved config keeps what was given.
    quarter = config.load(REPO / "configs" / "demo.yaml", ["data.train_fraction=0.25", "train.steps_at_fraction=same"])
    fewer = config.load(REPO / "configs" / "demo.yaml", ["data.train_fraction=0.25"])
    assert (quarter.train.epochs, quarter.train.warmup_epochs) == (4 * base.train.epochs, 4 * base.train.warmup_epochs)
    assert (fewer.train.epochs, fewer.train.warmup_epochs) == (base.train.epochs, base.train.warmup_epochs)
    (tmp_path / "quarter").mkdir()
    config.save(quarter, tmp_path / "quarter" / "config.yaml")
    assert config.load(tmp_path / "quarter" / "config.yaml") == quarter
    assert read_run(tmp_path / "quarter").epochs_planned == 4 * base.train.epochs
    with pytest.raises(ConfigError, match="data.train_fraction"):
        config.load(None, ["data.train_fraction=1.5"])


def test_a_grid_over_train_length_refuses_two_values_with_one_schedule(tmp_path, capsys):
    from launch.sweep import main

    epochs = config.load(REPO / "configs" / "demo.yaml").train.epochs
    args = ["--config", str(REPO / "configs" / "demo_sweep.yaml"), "--out", str(tmp_path / "o"), "--print-config",
            "--runs", "resnet18_scratch"]
    assert main([*args, "--grid", "train.length=0.5,1,2"]) == 0
    lengths = [(d["train"]["length"], d["train"]["epochs"]) for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    assert lengths == [(0.5, epochs), (1.0, epochs), (2.0, epochs)]  # as given: the report's axis
    assert main([*args, "--grid", f"train.length=1,{1 + 0.4 / epochs}"]) == 2
    assert f"grid train.length: 1 and {1 + 0.4 / epochs} both give {epochs} epochs" in capsys.readouterr().err


# -- the two phases, for real -------------------------------------------------------------------------

@pytest.mark.slow
def test_two_phase_sweep_runs_each_winner_on_the_seeds_and_resumes_without_rerunning(tmp_path, capsys):
    """--tune 2 --seeds 0,1 on the local executor: 2 trials an arm on seed 0, the held-out winner's exact
    settings on both seeds, the report; with --keep-checkpoints winners, the losing trials' checkpoints
    deleted; run again after losing one phase-2 run, only that run trains."""
    from launch.sweep import main

    from helpers import preprocessed_dataset

    data = preprocessed_dataset(tmp_path / "d", 60, 12, seed=2, size=32)
    sweep_file = tmp_path / "tune.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "t", "config": str(REPO / "configs" / "demo.yaml"),
        "arms": {"r18": ["model.depth=18", "model.weights=none"], "r34": ["model.depth=34", "model.weights=none"]},
        "search": {"seed": 1, "space": {"train.lr": "loguniform(0.001, 0.3)"}}}))
    args = ["--config", str(sweep_file), "--executor", "local", "--parallel", "2", "--tune", "2", "--seeds", "0,1",
            "--out", str(tmp_path / "sweep"), f"data.root={data}", "data.image_size=32", "train.epochs=2",
            "train.batch_size=8", "data.workers=0", "train.warmup_epochs=0", "data.val_fraction=0.2",
            "data.min_val_images=5", "--keep-checkpoints", "winners"]
    assert main(args) == 0
    out = capsys.readouterr().out
    sweep = tmp_path / "sweep"
    choice = json.loads((sweep / "tuning.json").read_text())
    for arm in ("r18", "r34"):
        entry = choice["arms"][arm]
        assert entry["finished"] == 2 and len(entry["trials"]) == 2
        best = max(entry["trials"], key=lambda t: t["held_out"])
        assert entry["winner"]["trial"] == best["trial"]
        for seed in (0, 1):  # phase 2: exactly the winner's settings, on each seed
            run = sweep / arm / best["trial"] / f"seed{seed}"
            saved = yaml.safe_load((run / "config.yaml").read_text())
            assert saved["train"]["lr"] == best["values"]["train.lr"] and saved["train"]["seed"] == seed
            assert saved["wandb"]["trial"] == "train.lr"
            assert (run / "summary.json").is_file()
            assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_best.pt", "checkpoint_last.pt"]
        assert f"{arm}: winner {best['trial']}" in out
        for trial in entry["trials"]:  # the winner keeps its checkpoints; the loser, its summary and a note
            kept = sorted(p.name for p in (sweep / "tune" / arm / trial["trial"]).glob("checkpoint*"))
            won = trial["trial"] == best["trial"]
            assert kept == (["checkpoint_best.pt", "checkpoint_last.pt"] if won else ["checkpoints_pruned.txt"])
    assert "the checkpoints of 2 losing run(s) deleted (0 pruned earlier" in out
    results = (sweep / "results.md").read_text()
    assert "Tuning (phase 1 of --tune) and the best held-out score of k trials" in results  # the table's title now
    assert (sweep / "expected_best.png").is_file()
    from dr_resnet.results.rundir import LAUNCH_LINE

    launches = {p: len(LAUNCH_LINE.findall(p.read_text())) for p in sweep.rglob("train.log")}
    assert set(launches.values()) == {1}
    assert len(launches) == 8
    lost = sweep / "r18" / choice["arms"]["r18"]["winner"]["trial"] / "seed1"
    import shutil
    shutil.rmtree(lost)
    assert main(args) == 0
    again = capsys.readouterr().out
    assert again.count("finished earlier") == 7  # 4 trials and 3 phase-2 runs
    assert "0.0 MB freed, the checkpoints of 0 losing run(s) deleted (2 pruned earlier" in again
    assert {p: len(LAUNCH_LINE.findall(p.read_text())) for p in sweep.rglob("train.log")} == launches
    assert (lost / "summary.json").is_file()
    # The answer's training minutes count the trials too, found in the sweep's own layout: the same once the
    # sweep folder is moved (tuning.json's recorded paths then point nowhere).
    from dr_resnet.results.answer import answer_rows, headline
    from dr_resnet.results.arms import find_runs, group_arms
    from dr_resnet.results.tuning import read_choice

    def minutes(root: Path) -> list[tuple[float, float]]:
        heads = headline(group_arms(find_runs(root)), set(), read_choice(root))
        finals = [sum(row["epoch_seconds"] for r in h.arm.runs for row in r.rows) / 60 for h in heads]
        return [(row["minutes"], final) for row, final in zip(answer_rows(heads, root), finals)]
    before = minutes(sweep)
    assert len(before) == 2 and all(total > final > 0 for total, final in before)
    moved = tmp_path / "moved"
    shutil.move(sweep, moved)
    assert minutes(moved) == before


def test_epochs_to_reach_and_the_spread_over_seeds():
    from dr_resnet.results.factors import epochs_to_reach, spread

    rows = [{"epoch": e, "val_qwk": q} for e, q in enumerate([0.2, 0.5, 0.78, 0.81, 0.80], start=1)]
    assert epochs_to_reach(rows) == 3  # 0.78 >= 0.95 x 0.80 = 0.76
    assert epochs_to_reach([{"epoch": 1, "test_qwk": 0.5}]) is None  # no held-out part
    assert epochs_to_reach([{"epoch": 1, "val_qwk": 0.0}]) is None
    one, three = spread([0.5]), spread([0.8, 0.9, 1.0])
    assert one == {"mean": 0.5, "low": None, "high": None, "n": 1}
    assert three["mean"] == pytest.approx(0.9) and three["high"] - 0.9 == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-4)
    # 11 seeds: Student's t at 10 degrees of freedom (2.228), not the normal's 1.96 (12% too narrow)
    eleven = spread([0.8 + 0.01 * i for i in range(11)])
    assert eleven["high"] - eleven["mean"] == pytest.approx(2.228 * np.std([0.01 * i for i in range(11)], ddof=1)
                                                            / math.sqrt(11), rel=1e-3)


def test_tune_plans_phase_one_from_the_search_and_refuses_without_one(tmp_path, capsys):
    from launch.sweep import main

    assert main(["--config", str(REPO / "configs" / "demo_tune.yaml"), "--tune", "3", "--seeds", "1,2",
                 "--runs", "resnet18_scratch,resnet50_scratch", "--out", str(tmp_path / "t"), "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "phase 1 of --tune: 6 runs (3 trials an arm, seed 0)" in text
    docs = [d for d in yaml.safe_load_all(text.split("\n", 1)[1]) if d]
    assert len(docs) == 6 and {d["train"]["seed"] for d in docs} == {0}
    folders = sorted(d["output"]["dir"].split("/t/")[1] for d in docs)
    lrs = {arm: sorted(d["train"]["lr"] for d in docs if f"/{arm}/" in d["output"]["dir"])
           for arm in ("resnet18_scratch", "resnet50_scratch")}
    assert lrs["resnet18_scratch"] == lrs["resnet50_scratch"]  # one search range: the same draws
    assert all(f.startswith("tune/resnet") and f.count("/") == 2 for f in folders)
    assert all(d["wandb"]["trial"] == "train.lr" and 0.005 <= d["train"]["lr"] <= 0.5 for d in docs)
    # the demo's own search at 8 trials: every name its own (3 significant digits made two collide before)
    assert main(["--config", str(REPO / "configs" / "demo_tune.yaml"), "--tune", "8", "--seeds", "1,2",
                 "--out", str(tmp_path / "t8"), "--print-config"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out.split("\n", 1)[1]) if d]
    assert len(docs) == 32 and len({d["output"]["dir"] for d in docs}) == 32
    scratch = [d["train"]["lr"] for d in docs if "/resnet18_scratch/" in d["output"]["dir"]]
    quarters = np.histogram(np.log10(scratch), bins=4, range=(math.log10(0.005), math.log10(0.5)))[0]
    assert quarters.tolist() == [2, 2, 2, 2]
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"name": "p", "config": str(REPO / "configs" / "demo.yaml"),
                                     "arms": {"r18": ["model.depth=18"]}}))
    assert main(["--config", str(plain), "--tune", "2", "--seeds", "1", "--print-config"]) == 2
    assert "tunes the sweep file's search: block or the grid keys named searched" in capsys.readouterr().err


# -- searched keys and factors --------------------------------------------------------------------------

def test_searched_keys_and_factors_are_told_apart_recorded_and_warned_of(tmp_path, capsys, monkeypatch):
    """A grid key is a factor unless searched: names it (or --searched); a search: key always is searched;
    the manifest lists both; searched keys without --tune get one warning line; an unknown name is an error."""
    from launch import sweep

    monkeypatch.setattr(sweep, "make_executor", lambda *a, **k: None)  # submit nothing: the manifest is the point
    monkeypatch.setattr(sweep, "submit_each", lambda *a, **k: iter(()))
    sweep_file, out = tmp_path / "sweep.yaml", tmp_path / "out"

    def launch(*extra: str, **content) -> dict:
        sweep_file.write_text(yaml.safe_dump({"name": "f", "config": str(REPO / "configs" / "demo.yaml"),
                                              "arms": {"r18": ["model.depth=18", "model.weights=none"]},
                                              "grid": {"train.lr": [0.01, 0.1]}, **content}))
        assert sweep.main(["--config", str(sweep_file), "--out", str(out), "--grid", "data.train_fraction=0.5,1",
                           *extra]) == 0
        manifest = json.loads((out / "sweep.json").read_text())
        return {"searched": manifest["searched"], "factors": manifest["factors"], "err": capsys.readouterr().err}

    plain = launch()
    assert (plain["searched"], plain["factors"]) == ([], ["data.train_fraction", "train.lr"])
    assert "warning" not in plain["err"]  # factors only: every value is reported, nothing chosen
    for named in (launch(searched=["train.lr"]), launch("--searched", "train.lr")):
        assert (named["searched"], named["factors"]) == (["train.lr"], ["data.train_fraction"])
        [line] = [line for line in named["err"].splitlines() if "warning" in line]
        assert line == ("warning: train.lr searched without --tune: choosing among its values on the same seeds that are "
                        "then compared on test favours the noisier arm; use --tune (phase 1 chooses on held-out figures, "
                        "phase 2 runs the choice on fresh seeds)")
    drawn = launch(grid={"data.image_size": [32, 48]}, search={"trials": 2, "space": {"train.lr": "loguniform(0.01, 0.1)"}})
    assert (drawn["searched"], drawn["factors"]) == (["train.lr"], ["data.image_size", "data.train_fraction"])
    assert drawn["err"].count("searched without --tune") == 1
    with pytest.raises(ConfigError, match=r"--searched: train.momentum is not a grid key \(the grid varies "
                                          r"data.train_fraction, train.lr\)"):
        trials.roles({"train.lr", "data.train_fraction"}, [], {"--searched": ["train.momentum"]})
    sweep_file.write_text(sweep_file.read_text().replace("search:", "searched: [train.weight_decay]\nsearch:"))
    assert sweep.main(["--config", str(sweep_file), "--print-config"]) == 2
    assert f"{sweep_file}: searched: train.weight_decay is not a grid key" in capsys.readouterr().err
    sweep_file.write_text(sweep_file.read_text().replace("searched: [train.weight_decay]", "searched: lr"))
    assert sweep.main(["--config", str(sweep_file), "--print-config"]) == 2
    assert "'searched' lists grid keys as section.key names" in capsys.readouterr().err


def test_tune_refuses_a_grid_factor_and_tunes_a_searched_grid_key(tmp_path, capsys):
    from launch.sweep import main

    args = ["--config", str(REPO / "configs" / "demo_tune.yaml"), "--tune", "2", "--seeds", "1", "--runs",
            "resnet18_scratch", "--out", str(tmp_path / "t"), "--print-config", "--grid", "train.weight_decay=0,0.0001"]
    assert main(args) == 2
    assert ("--tune with the grid factor(s) train.weight_decay: phase 1 would choose among a factor's values"
            in capsys.readouterr().err)
    assert main([*args, "--searched", "train.weight_decay"]) == 0
    captured = capsys.readouterr()
    assert "phase 1 of --tune: 4 runs" in captured.out and "without --tune" not in captured.err


def test_tune_records_the_roles_at_the_sweeps_top_and_tags_each_phase_in_wandb(tmp_path, monkeypatch):
    """--tune end to end with the jobs faked (phase 1's metrics written as its trials would): both manifests
    list the searched keys and factors, phase 1's runs get wandb.tags=tune and phase 2's final, each added to
    the user's own tags; the live view of phase 1 knows each run's arm and trial."""
    from launch import sweep

    monkeypatch.setattr(sweep, "make_executor", lambda *a, **k: None)
    monkeypatch.setattr(sweep, "submit_each", lambda *a, **k: iter(()))
    monkeypatch.setattr(sweep, "wait_and_report", lambda *a, **k: 0)
    submitted, watched = [], {}
    original = sweep.submit

    def submit(args, argv, plans, out, *rest, **kwargs):
        submitted.append(plans)
        return original(args, argv, plans, out, *rest, **kwargs)

    def phase_one_done(jobs, plans, poll_s=5.0, trials_of=None):
        watched.update(trials_of or {})
        for index, (run_dir, _, cfg) in enumerate(plans.values()):
            rows = [{"epoch": e, "val_qwk": 0.1 * index + 0.01 * e, "test_qwk": 0.5,
                     "val_confusion_matrix": np.eye(5, dtype=int).tolist()} for e in range(1, cfg.train.epochs + 1)]
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return []
    monkeypatch.setattr(sweep, "submit", submit)
    monkeypatch.setattr(sweep, "wait_for_all", phase_one_done)
    sweep_file, out = tmp_path / "sweep.yaml", tmp_path / "out"
    sweep_file.write_text(yaml.safe_dump({
        "name": "p", "config": str(REPO / "configs" / "demo.yaml"),
        "arms": {"r18": ["model.depth=18", "model.weights=none", "wandb.tags=cohort-a"]},
        "grid": {"train.weight_decay": [0, 0.0001]}, "searched": ["train.weight_decay"],
        "search": {"space": {"train.lr": "loguniform(0.01, 0.1)"}}}))
    assert sweep.main(["--config", str(sweep_file), "--out", str(out), "--tune", "2", "--seeds", "1,2",
                       "wandb.project=mine"]) == 0
    for manifest in (out / "sweep.json", out / "tune" / "sweep.json"):
        content = json.loads(manifest.read_text())
        assert (content["searched"], content["factors"]) == (["train.lr", "train.weight_decay"], []), manifest
    phase1, phase2 = submitted
    assert len(phase1) == 4 and len(phase2) == 2
    for plans, tag in ((phase1, "tune"), (phase2, "final")):
        for run_dir, argv, cfg in plans.values():
            assert argv[-1] == f"wandb.tags=cohort-a,{tag}" and cfg.wandb.tags == f"cohort-a,{tag}"
            assert yaml.safe_load((run_dir / "config.yaml").read_text())["wandb"]["tags"] == f"cohort-a,{tag}"
    assert watched == {name: ("r18", name.removeprefix("r18_")) for name in phase1}


def test_a_job_ended_from_outside_is_lost_and_rerun_not_counted_as_failed(tmp_path, capsys):
    """A trial whose job died with its own error in train.log failed; one whose job was ended from outside (a
    lost node, a time-out: no error of its own) is lost: tuning counts it as 'to rerun', never as failed."""
    from launch.sweep import wait_for_all

    class Ended:
        job_id, state = "41", "NODE_FAIL"

        def done(self) -> bool:
            return True

        def result(self):
            raise RuntimeError("Job 41 (task: 0) with path /x/41_0_result.pkl has not produced any output (state: NODE_FAIL)")

        results = result

    tune = tmp_path / "tune"
    write_trial(tune / "r18" / "own", [0.5], [0.5], "0.1", epochs=3)
    (tune / "r18" / "own" / "train.log").write_text(
        "2026-12-07 10:00:00 INFO dr_resnet.train: dr_resnet 0.4.0: config x\n"
        "2026-12-07 10:01:00 ERROR dr_resnet.train: NonFiniteError: loss is nan at step 12\n")
    write_trial(tune / "r18" / "away", [0.5], [0.5], "0.2", epochs=3)
    plans = {name: (tune / "r18" / name, [], config.load(REPO / "configs" / "demo.yaml", ["train.epochs=3"]))
             for name in ("own", "away")}
    assert wait_for_all({name: Ended() for name in plans}, plans, poll_s=0) == ["own", "away"]
    err = capsys.readouterr().err
    assert "own: FAILED (job 41): NonFiniteError: loss is nan at step 12" in err
    assert "away: LOST (job 41)" in err and "running the sweep again reruns it" in err
    choice = tuning.choose(tune, {"r18": {"own": {"train.lr": "0.1"}, "away": {"train.lr": "0.2"}}})
    status = {t["trial"]: t["status"] for t in choice["arms"]["r18"]["trials"]}
    assert status == {"own": "failed", "away": "not finished"} and choice["arms"]["r18"]["to_rerun"] == ["away"]


def test_the_tuning_table_says_how_repeated_configurations_are_counted(tmp_path):
    from dr_resnet.results.tables import markdown, tuning_table

    tune = tmp_path / "tune"
    for name, lr in (("t00-lr0.1", "0.1"), ("t01-lr0.1", "0.1"), ("t02-lr0.3", "0.3")):
        write_trial(tune / "r18" / name, [0.5], [0.5], lr)
    choice = tuning.choose(tune, {"r18": {n: {"train.lr": n.rsplit("lr", 1)[1]} for n in ("t00-lr0.1", "t01-lr0.1",
                                                                                        "t02-lr0.3")}})
    curves = tuning.curves_of(choice)
    assert "repeat" not in "\n".join(markdown(tuning_table(choice, curves, "")))
    choice.update(repeats=True, distinct_configurations={"r18": 2})
    text = "\n".join(markdown(tuning_table(choice, curves, "")))
    assert "fewer distinct configurations than trials ({'r18': 2})" in text and "each counts as one trial in N" in text


def test_tune_over_a_searched_grid_without_a_search_block_and_never_without_fresh_seeds(tmp_path, capsys):
    """--tune tunes a grid over keys named searched (its points are the trials, so N must be their count);
    without --seeds phase 2 would rerun each winner on the seed that chose it: refused."""
    from launch.sweep import main

    args = ["--config", str(REPO / "configs" / "demo_sweep.yaml"), "--runs", "resnet18_scratch", "--out",
            str(tmp_path / "t"), "--print-config", "--grid", "train.lr=0.01,0.05", "--searched", "train.lr"]
    assert main([*args, "--tune", "2", "--seeds", "1,2"]) == 0
    assert "phase 1 of --tune: 2 runs (2 trials an arm, seed 0)" in capsys.readouterr().out
    assert main([*args, "--tune", "3", "--seeds", "1,2"]) == 2
    assert "gives 2 trials an arm: give --tune 2" in capsys.readouterr().err
    assert main([*args, "--tune", "2"]) == 2
    assert "--tune 2 needs --seeds" in capsys.readouterr().err
    assert main([a for a in args if a not in ("--searched", "train.lr")] + ["--tune", "2", "--seeds", "1"]) == 2
    assert "--tune with the grid factor(s) train.lr" in capsys.readouterr().err


# -- --keep-checkpoints winners: the losers' checkpoints pruned once the winners are chosen ---------------

@pytest.fixture(scope="module")
def trained_trial(tmp_path_factory) -> tuple[Path, Path]:
    """(the dataset, one real trial run: ResNet18, one epoch, a held-out part), copied below as every trial
    and run of a tuned sweep."""
    from dr_resnet.training.train import main

    from helpers import demo_args, preprocessed_dataset

    base = tmp_path_factory.mktemp("prune")
    data = preprocessed_dataset(base, 40, 13, seed=5, size=48)
    assert main(demo_args(data, base / "run", *TRIAL_ARGS, epochs=1, workers=0)) == 0
    return data, base / "run"


TRIAL_ARGS = ("model.depth=18", "data.val_fraction=0.25", "data.min_val_images=5")


def trial_copy(run: Path, folder: Path, held_out: float | None = None) -> Path:
    """A copy of the trained run in `folder`, its held-out QWK set to `held_out` (the tune's ranking)."""
    import shutil

    shutil.copytree(run, folder)
    if held_out is not None:
        rows = [{**json.loads(line), "val_qwk": held_out} for line in (folder / "metrics.jsonl").read_text().splitlines()]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_keep_checkpoints_winners_deletes_the_losers_checkpoints_and_nothing_else(trained_trial, tmp_path, capfd):
    """After the choice: every checkpoint file of the losing finished runs (phase 1's other trials, an earlier
    winner's runs on every seed) goes, with a note in each folder and one line of the space freed; the
    winner's, the phase-2 runs' and an unfinished trial's stay (the next launch resumes it). The report still
    builds, and says which galleries cannot be drawn; training in a pruned folder stops in one line instead
    of starting over, and evaluate says why the checkpoint is gone."""
    from dr_resnet.evaluate import main as evaluate
    from dr_resnet.results.report import report
    from dr_resnet.training.train import main as train
    from launch.pruning import prune_losers, size_text

    from helpers import demo_args

    data, run = trained_trial
    out = tmp_path / "sweep"
    tune = out / "tune" / "r18"
    scores = {"t00-lr0.01": 0.3, "t01-lr0.1": 0.8, "t02-lr1": 0.5}
    for name, score in scores.items():
        trial_copy(run, tune / name, score)
    stopped = trial_copy(run, tune / "t03-lr3")  # stopped in its first epoch: a checkpoint, no epoch logged yet
    (stopped / "metrics.jsonl").unlink()
    (stopped / "summary.json").unlink()
    earlier = [trial_copy(run, out / "superseded" / "r18" / "t00-lr0.01" / f"seed{k}") for k in (1, 2)]
    final = trial_copy(run, out / "r18" / "t01-lr0.1" / "seed1")  # phase 2 of the winner
    choice = tuning.choose(out / "tune", {"r18": {n: {"train.lr": n.rsplit("lr", 1)[1]} for n in [*scores, "t03-lr3"]}})
    (out / tuning.TUNING_FILE).write_text(json.dumps(choice))
    assert choice["arms"]["r18"]["winner"]["trial"] == "t01-lr0.1"
    before = {p: p.stat().st_size for p in out.rglob("checkpoint_*.pt")}
    files_of = {p.parent: sorted(f.name for f in p.parent.iterdir()) for p in out.rglob("config.yaml")}

    line = prune_losers(out, choice, on="2026-12-08")
    losers = [tune / "t00-lr0.01", tune / "t02-lr1", *earlier]
    gone = set(before) - set(out.rglob("checkpoint_*.pt"))
    assert gone == {d / name for d in losers for name in ("checkpoint_last.pt", "checkpoint_best.pt")}
    freed = sum(before[p] for p in gone)
    assert line == (f"--keep-checkpoints winners: {size_text(freed)} freed, the checkpoints of 4 losing run(s) deleted "
                    f"(0 pruned earlier; their summaries, logs and predictions stay, and a note, checkpoints_pruned.txt); "
                    f"1 unfinished kept theirs (the next launch resumes them)")
    for folder in losers:
        assert (folder / "checkpoints_pruned.txt").read_text() == (
            f"checkpoints pruned by --keep-checkpoints winners on 2026-12-08 (checkpoint_last.pt, checkpoint_best.pt: "
            f"{size_text(freed // 4)})\n")
    for folder, names in files_of.items():  # every other file of every run is still there
        assert sorted(f.name for f in folder.iterdir() if f.name != "checkpoints_pruned.txt") == \
            [n for n in names if not (folder in losers and n.startswith("checkpoint_"))]
    assert {p for p in before if p not in gone} == {d / n for d in (tune / "t01-lr0.1", stopped, final)
                                                    for n in ("checkpoint_last.pt", "checkpoint_best.pt")}
    assert prune_losers(out, choice).startswith("--keep-checkpoints winners: 0.0 MB freed, the checkpoints of 0 losing "
                                                "run(s) deleted (4 pruned earlier")

    # The report builds from the pruned sweep (tuning.json, the phase-2 run) and from the pruned runs alone.
    assert (out / "results.md") in report(out)
    assert "Tuning (phase 1 of --tune)" in (out / "results.md").read_text()
    if importlib.util.find_spec("captum") is not None:  # the gallery is the [cam] extra's
        capfd.readouterr()
        report(out / "superseded", gallery=True)
        err = capfd.readouterr().err
        for folder in earlier:
            assert (f"r18/t00-lr0.01/{folder.name}: no gallery: {folder / 'checkpoint_best.pt'} is gone: checkpoints "
                    f"pruned by --keep-checkpoints winners on 2026-12-08") in err

    # Training in a pruned folder stops in one line, trains nothing; evaluate names why the file is gone.
    loser = tune / "t00-lr0.01"
    logged = (loser / "metrics.jsonl").read_text()
    capfd.readouterr()
    assert train(demo_args(data, loser, *TRIAL_ARGS, epochs=2, workers=0)) == 2
    err = capfd.readouterr().err
    assert (f"{loser}: checkpoints pruned by --keep-checkpoints winners on 2026-12-08 (checkpoint_last.pt, "
            f"checkpoint_best.pt: {size_text(freed // 4)}), so the run cannot resume, and it is not trained again from "
            f"scratch in place: set output.dir (or launch.sweep's --out) to another folder, or delete {loser} to train "
            f"it there anew") in err
    assert "Traceback" not in err and "epoch 1/2" not in err
    assert (loser / "metrics.jsonl").read_text() == logged and not (loser / "checkpoint_last.pt").exists()
    assert evaluate(["--checkpoint", str(loser / "checkpoint_best.pt"), "--data-root", str(data), "--device", "cpu",
                     "--workers", "0", "--out", str(tmp_path / "eval")]) == 2
    assert f"{loser / 'checkpoint_best.pt'} is gone: checkpoints pruned by --keep-checkpoints winners" in capfd.readouterr().err


def test_keep_checkpoints_winners_needs_tune(tmp_path, capsys):
    from launch.sweep import main

    with pytest.raises(SystemExit):
        main(["--config", str(REPO / "configs" / "demo_sweep.yaml"), "--out", str(tmp_path / "s"), "--print-config",
              "--keep-checkpoints", "winners"])
    assert "--keep-checkpoints winners prunes once --tune has chosen the winners: give --tune N" in capsys.readouterr().err
