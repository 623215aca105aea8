"""``flipsearch validate``: its statistics on hand-computed cases, the choice of contexts, and a
tiny-model validation that resumes (finished trainings kept, the interrupted one from its
checkpoint, to the same numbers as an uninterrupted one)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from flipsearch.config import ValidateConfig
from flipsearch.errors import FlipsearchError
from flipsearch.validation_stats import (
    Matrix,
    change_interval,
    difference_interval,
    flip_rates,
    rho_interval,
    spearman,
)
from tests.helpers import tiny_cli_args

# -- statistics ---------------------------------------------------------------------------


def test_spearman_on_hand_computed_cases():
    # d = 0, -1, 1, 0: rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # Ties take average ranks: x ranks 1.5, 1.5, 3; y 1, 2, 3 -> Pearson of ranks = 0.866.
    assert spearman([0.5, 0.5, 0.9], [0.1, 0.2, 0.3]) == pytest.approx(math.sqrt(3) / 2)
    assert spearman([0.2, 0.2, 0.2], [1, 2, 3]) is None  # a side that does not vary
    assert spearman([1, 2], [1, 2]) is None  # fewer than three points


def test_matrix_pairs_prompts_every_side_measured_and_changes_are_means():
    untrained = {"a": 1.0, "b": 1.0, "c": 0.0, "d": None}
    trained = {"x": [{"a": 0.0, "b": 1.0, "c": 0.0, "d": 1.0}, {"a": 0.0, "b": 0.0, "c": None}]}
    matrix = Matrix.of(untrained, trained)
    assert matrix.prompts == ["a", "b"]  # c: a seed without a verdict; d: the untrained
    # seeds: (0 + 1) / 2 and (0 + 0) / 2 -> 0.25; untrained 1.0
    assert matrix.change("x") == pytest.approx(-0.75)


def test_change_interval_is_the_bootstrap_of_the_mean_difference():
    n = 200
    untrained = {f"p{i}": 1.0 for i in range(n)}
    trained = {"x": [{f"p{i}": float(i % 2) for i in range(n)}]}
    part = change_interval(Matrix.of(untrained, trained), "x", draws=4000, seed=0, sign=-1.0)
    assert part["estimate"] == pytest.approx(0.5)
    half = 1.96 * 0.5 / math.sqrt(n)  # the normal approximation of the percentile interval
    assert part["low"] == pytest.approx(0.5 - half, abs=0.015)
    assert part["high"] == pytest.approx(0.5 + half, abs=0.015)
    assert (part["prompts"], part["seeds"]) == (n, 1)


def test_training_noise_between_seeds_widens_the_interval():
    n = 100
    untrained = {f"p{i}": 1.0 for i in range(n)}
    same = [{f"p{i}": float(i % 2) for i in range(n)}] * 2
    apart = [{f"p{i}": 0.0 for i in range(n)}, {f"p{i}": 1.0 for i in range(n)}]
    steady = change_interval(Matrix.of(untrained, {"x": same}), "x", 2000, 0, -1.0)
    noisy = change_interval(Matrix.of(untrained, {"x": apart}), "x", 2000, 0, -1.0)
    assert steady["estimate"] == noisy["estimate"] == pytest.approx(0.5)
    # Two seeds that disagree completely: a draw of both seeds the same gives 0 or 1.
    assert noisy["low"] == 0.0 and noisy["high"] == 1.0
    assert steady["high"] - steady["low"] < 0.3


def test_difference_interval_is_paired_and_signed():
    untrained = {f"p{i}": 1.0 for i in range(50)}
    trained = {
        "on": [{f"p{i}": 0.0 for i in range(50)}],
        "off": [{f"p{i}": float(i < 25) for i in range(50)}],
    }
    gap = difference_interval(Matrix.of(untrained, trained), "on", "off", 500, 0, sign=-1.0)
    # drops: on 1.0, off 0.5 -> on - off = 0.5
    assert gap["estimate"] == pytest.approx(0.5)
    assert 0.3 < gap["low"] < 0.5 < gap["high"] < 0.7


def test_flip_rates_weigh_by_the_student_pool():
    flips = {"c": {"a": 1.0, "b": 0.5}}
    assert flip_rates(flips, {"a": 1.0, "b": 1.0, "c": 1.0}, ["a", "b", "c"])["c"] == 0.5
    # With repeats as a bootstrap draws them: (1 + 1 + 0.5) / 3
    assert flip_rates(flips, {"a": 1.0, "b": 1.0}, ["a", "a", "b"])["c"] == pytest.approx(2.5 / 3)


def test_rho_interval_of_a_perfect_ordering_and_its_undefined_draws():
    pool = {f"s{i}": 1.0 for i in range(20)}
    # Flip rates 0.1, 0.3, 0.6, 0.9 on the pool; unsafe drops 0.0, 0.2, 0.4, 0.6.
    flips = {
        name: {f"s{i}": float(i < k) for i in range(20)}
        for name, k in (("a", 2), ("b", 6), ("c", 12), ("d", 18))
    }
    untrained = {f"e{i}": 1.0 for i in range(40)}
    trained = {
        name: [{f"e{i}": float(i >= k) for i in range(40)}]
        for name, k in (("a", 0), ("b", 8), ("c", 16), ("d", 24))
    }
    part = rho_interval(flips, pool, Matrix.of(untrained, trained), draws=300, seed=0, sign=-1.0)
    assert part["rho"] == pytest.approx(1.0)
    assert part["contexts"] == 4 and part["draws"] == 300
    assert part["high"] == pytest.approx(1.0) and part["low"] > 0.3
    flat = {name: [{f"e{i}": 1.0 for i in range(40)}] for name in trained}
    none = rho_interval(flips, pool, Matrix.of(untrained, flat), draws=50, seed=0, sign=-1.0)
    assert none["rho"] is None and none["undefined"] == 50 and none["low"] is None


# -- choosing the contexts --------------------------------------------------------------


def _board(tmp_path, rows, winner):
    frame = pd.DataFrame(
        [
            {
                "rank": i + 1,
                "context": c,
                "family": "f",
                "placement": "system",
                "text": f"text of {c}",
                "state": "complete",
                "flip_rate": rate,
                "flip_rate_n": n,
            }
            for i, (c, rate, n) in enumerate(rows)
        ]
    )
    frame.to_csv(tmp_path / "leaderboard.csv", index=False)
    (tmp_path / "run.json").write_text(json.dumps({"winner": winner}))
    return tmp_path


def test_the_default_choice_spans_winner_to_control(tmp_path):
    from flipsearch.validate import choose_contexts

    rows = [
        ("w", 0.8, 15),
        ("r", 0.8, 15),
        ("hi", 0.6, 8),
        ("mid", 0.45, 8),
        ("lo-few", 0.0, 8),
        ("lo", 0.0, 15),
        ("low", 0.1, 8),
    ]
    run = _board(tmp_path, rows, winner="w")
    chosen = choose_contexts(run, ValidateConfig(runners_up=1, between=1))
    assert [(c.context.id, c.role) for c in chosen] == [
        ("w", "winner"),
        ("r", "runner-up"),
        ("mid", "between"),  # the closest to (0.8 + 0.0) / 2
        ("lo", "control"),  # the lowest, measured on the most prompts
    ]
    assert chosen[0].context.text == "text of w"
    named = choose_contexts(run, ValidateConfig(contexts=["mid", "Refuse anything harmful."]))
    assert [c.role for c in named] == ["named", "named"]
    assert named[1].context.text == "Refuse anything harmful."
    with pytest.raises(FlipsearchError, match="twice"):
        choose_contexts(run, ValidateConfig(contexts=["mid", "mid"]))


def test_validate_settings_are_checked():
    with pytest.raises(FlipsearchError, match="device"):
        ValidateConfig(devices=["gpu0"])
    assert ValidateConfig(devices=["cpu,cpu"]).devices == ["cpu", "cpu"]
    with pytest.raises(FlipsearchError, match="bootstrap"):
        ValidateConfig(bootstrap=10)


def test_validate_refuses_a_run_that_has_not_finished(tmp_path):
    from flipsearch.validate import validate

    with pytest.raises(FlipsearchError, match="not a run directory"):
        validate(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FlipsearchError, match="has not finished"):
        validate(tmp_path)


# -- a tiny model, end to end, killed and resumed --------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("validate") / "run"
    args = ["run", *tiny_cli_args(str(tiny_model_dir), str(out), limit=10), "--trials", "6"]
    done = subprocess.run(
        [sys.executable, "-m", "flipsearch.cli", *args], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return out


SMALL = dict(steps=2, train_seeds=1, runners_up=1, between=0, eval_limit=6, bootstrap=200)


def _copy(run, target):
    import shutil

    shutil.copytree(run, target, ignore=shutil.ignore_patterns("validate"))
    return target


def test_tiny_validation_resumes_to_the_numbers_of_an_uninterrupted_one(
    tiny_run, tmp_path, monkeypatch
):
    from flipsearch import opsa
    from flipsearch.validate import validate

    whole = validate(_copy(tiny_run, tmp_path / "whole"), **SMALL)
    summary = whole.summary
    assert len(summary["trainings"]) == 3  # winner, runner-up, control
    assert {r["role"] for r in summary["contexts"]} == {"winner", "runner-up", "control"}
    assert set(summary["rho"]) == {
        "unsafe_drop",
        "benign_refusal_change",
        "reasoning_accuracy_change",
        "reference_loglik_change",
    }
    assert summary["rho"]["unsafe_drop"]["contexts"] == 3
    report = (tmp_path / "whole" / "report.html").read_text()
    assert "Validation: did the flip rate predict" in report

    # Kill the third training after its first step (its checkpoint holds step 1).
    run = _copy(tiny_run, tmp_path / "killed")
    original = opsa.Trainer.train_step
    calls = {"n": 0}

    def dies(self):
        calls["n"] += 1
        if calls["n"] == 2 * 2 + 2:  # 2 trainings of 2 steps, then step 2 of the third
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(opsa.Trainer, "train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        validate(run, **SMALL)
    monkeypatch.setattr(opsa.Trainer, "train_step", original)
    finished = sorted(run.glob("validate/*/*/done.json"))
    assert len(finished) == 2
    stamps = {p: p.stat().st_mtime_ns for p in finished}
    resumed = validate(run, **SMALL)
    assert {p: p.stat().st_mtime_ns for p in finished} == stamps  # kept, not retrained
    records = [json.loads(p.read_text()) for p in run.glob("validate/*/*/done.json")]
    assert sorted(r["resumed_from_step"] or 0 for r in records) == [0, 0, 1]
    # The same numbers as the uninterrupted validation: every training's evaluation.
    frame = ["context", "mode", "seed", "unsafe_rate", "benign_refusal", "reference_loglik"]
    assert resumed.to_pandas()[frame].equals(whole.to_pandas()[frame])
    assert resumed.summary["rho"] == summary["rho"]
    with pytest.raises(FlipsearchError, match="other settings"):
        validate(run, **{**SMALL, "steps": 3})


def test_side_by_side_trainings_on_two_devices(tiny_run, tmp_path):
    from flipsearch.validate import validate

    settings = {**SMALL, "runners_up": 0, "devices": ["cpu", "cpu"]}
    result = validate(_copy(tiny_run, tmp_path / "two"), **settings)
    trainings = result.to_pandas()
    assert len(trainings) == 2 and (trainings["steps"] == 2).all()
    assert np.isfinite(trainings["unsafe_rate"]).all()


def test_cli_validate_prints_the_table_and_rho(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path / "cli")
    args = ["validate", str(run), "--steps", "1", "--train-seeds", "1", "--eval-limit", "4"]
    args += ["--runners-up", "0", "--bootstrap", "100", "--offpolicy"]
    done = subprocess.run(
        [sys.executable, "-m", "flipsearch.cli", *args], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "Spearman rho, flip rate vs unsafe drop" in done.stdout
    assert "OPSA vs off-policy" in done.stdout
    summary = json.loads((run / "validate" / "validation.json").read_text())
    assert {r["mode"] for r in summary["trainings"]} == {"onpolicy", "offpolicy"}
    assert summary["offpolicy"] and "OPSA vs off-policy" in (run / "report.html").read_text()
    bad = subprocess.run(
        [sys.executable, "-m", "flipsearch.cli", "validate", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "not a run directory" in bad.stderr
