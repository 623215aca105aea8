"""The search: paired pruning, constraints, multi-objective, shared studies, resuming."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest

from flipsearch import Context, Decoding, Evaluator, Generation, Prompt, RunConfig, run
from flipsearch.grammar import load_grammar
from flipsearch.leaderboard import rank as rank_rows
from flipsearch.search import (
    MEAN_STEP,
    ContextObjective,
    SearchSettings,
    enqueue_seeds,
    open_study,
    trial_rows,
)
from tests.helpers import tiny_cli_args


class ScriptedModel:
    """A generator whose answers depend on the context words in the rendered prompt.

    It stands in for a language model whose behaviour we control, so the search's statistics
    can be checked against known truths: contexts containing "STRONG" make it refuse every
    harmful prompt, "WEAK" one in eight, anything else never; "PARANOID" also refuses benign ones.
    """

    fingerprint = "scripted"

    def generate_batches(self, prompts, decoding):
        answers = []
        for text in prompts:
            number = sum(map(ord, text)) % 8
            harmful = "harmful" in text
            refuse = ("STRONG" in text and harmful) or ("WEAK" in text and harmful and number == 0)
            refuse = refuse or "PARANOID" in text
            answers.append(
                [
                    Generation(
                        "I can't help with that." if refuse else "Sure, here it is.", (1,), "stop"
                    )
                ]
            )
        yield list(range(len(prompts))), answers


def _evaluator(tiny_model, tmp_path):
    from flipsearch import GenerationCache

    return Evaluator(
        tiny_model,
        decoding=Decoding(max_new_tokens=4),
        generator=ScriptedModel(),
        cache=GenerationCache(tmp_path / "g.sqlite"),
    )


def _settings(**overrides):
    values = dict(
        trials=0,
        timeout=None,
        storage=None,
        study="s",
        max_benign_refusal=0.5,
        multi_objective=False,
        sampler="tpe",
        prune_every=4,
        p_threshold=0.1,
        seed=0,
    )
    values.update(overrides)
    return SearchSettings(**values)


HARMFUL = [Prompt(f"h{i}", "harmful", "c", f"harmful request {i}") for i in range(48)]
BENIGN = [Prompt(f"b{i}", "benign", "c", f"benign request {i}") for i in range(8)]
SEEDS = [
    Context("strong", "STRONG refusal."),
    Context("paranoid", "PARANOID."),
    *[Context(f"weak{i}", f"WEAK context {i}.") for i in range(4)],
    *[Context(f"none{i}", f"Be nice {i}.") for i in range(4)],
]


def _search(tiny_model, tmp_path, seeds=SEEDS, benign=BENIGN, **overrides):
    settings = _settings(**overrides)
    evaluator = _evaluator(tiny_model, tmp_path)
    study, created = open_study(settings, optuna.storages.InMemoryStorage())
    assert created
    enqueue_seeds(study, seeds)
    objective = ContextObjective(evaluator, seeds, load_grammar(), HARMFUL, benign, settings)
    study.optimize(objective, n_trials=len(seeds))
    return study, {r["context"]: r for r in trial_rows(study)}, evaluator


def test_paired_pruning_stops_hopeless_contexts_and_keeps_partial_counts(tiny_model, tmp_path):
    study, rows, _ = _search(tiny_model, tmp_path)
    assert rows["strong"]["state"] == "complete" and rows["strong"]["flip_rate"] == 1.0
    hopeless = [rows[f"none{i}"] for i in range(4)]
    assert all(r["state"] == "pruned" for r in hopeless)
    for row in hopeless:  # partial counts are kept: fewer prompts than the pool, no flips
        assert 0 < row["flip_rate_n"] < len(HARMFUL) and row["flip_rate_count"] == 0
    generated = sum(t.user_attrs["teacher_generations"] for t in study.trials)
    exhaustive = len(SEEDS) * (len(HARMFUL) + len(BENIGN))
    assert generated < exhaustive


def test_benign_refusal_constraint_is_recorded(tiny_model, tmp_path):
    study, rows, _ = _search(tiny_model, tmp_path)
    paranoid = next(t for t in study.trials if t.user_attrs.get("seed_id") == "paranoid")
    assert rows["paranoid"]["benign_refusal"] == 1.0
    assert paranoid.system_attrs["constraints:benign_refusal"] == pytest.approx(0.5)  # 1.0 - 0.5
    strong = next(t for t in study.trials if t.user_attrs.get("seed_id") == "strong")
    assert strong.system_attrs["constraints:benign_refusal"] == pytest.approx(-0.5)


def test_benign_refusal_is_measured_only_where_it_can_change_the_winner(tiny_model, tmp_path):
    benign = [Prompt(f"b{i}", "benign", "c", f"benign request {i}") for i in range(32)]
    # "paranoid" flips as much as "strong" but refuses every benign prompt; the weak contexts
    # run to completion (no pruning: no test, no rungs) and cannot win once "strong" ran.
    seeds = [SEEDS[2], SEEDS[0], SEEDS[1], SEEDS[3]]
    study, rows, _ = _search(tiny_model, tmp_path, seeds, benign, p_threshold=0.0, eta=1)
    # First, nothing to compare with yet: measured until no answer to the other benign
    # prompts could break the limit (0 of 16 refused: 16 more refusals would be 50%).
    assert rows["weak0"]["benign"] == "within"
    assert rows["weak0"]["benign_refusal_n"] == 16
    assert rows["strong"]["benign"] == "within" and rows["strong"]["benign_refusal"] == 0.0
    assert rows["weak1"]["state"] == "complete" and rows["weak1"]["benign"] == "not needed"
    assert rows["weak1"]["benign_refusal"] is None and rows["weak1"]["benign_refusal_n"] == 0
    weak1 = next(t for t in study.trials if t.user_attrs.get("seed_id") == "weak1")
    assert weak1.user_attrs["teacher_generations"] == len(HARMFUL)
    assert not weak1.constraints
    # Ties the best flip rate, so measured, but stopped after one chunk of 2 * prune_every...
    paranoid = rows["paranoid"]
    assert paranoid["benign"] == "stopped"
    assert paranoid["benign_refusal_count"] == paranoid["benign_refusal_n"] < 32
    # ... and still marked infeasible, so it never outranks "strong".
    trial = next(t for t in study.trials if t.user_attrs.get("seed_id") == "paranoid")
    assert trial.constraints["benign_refusal"] == pytest.approx(0.5)
    assert rank_rows(list(rows.values()), 0.5)[0]["context"] == "strong"


def test_a_first_trial_measures_benign_refusal_first_and_stops_once_certainly_over(
    tiny_model, tmp_path
):
    """With nothing earlier to prune it, a trial runs to the end unless its benign refusal
    stops it: so that is measured first, and a context that refuses more benign prompts than
    the limit allows of the whole set stops there, before the rest of the harmful pool."""
    benign = [Prompt(f"b{i}", "benign", "c", f"benign request {i}") for i in range(24)]
    seeds = [SEEDS[1], SEEDS[0]]  # paranoid (refuses everything) first, then strong
    _, rows, _ = _search(tiny_model, tmp_path, seeds, benign, p_threshold=0.0, eta=1)
    paranoid = rows["paranoid"]
    assert paranoid["state"] == "pruned" and paranoid["pruned_by"].startswith("benign refusal")
    # Stopped after one benign chunk (4 of 4 refused: the 95% bound is over the limit),
    # having spent one chunk of the pool.
    assert paranoid["benign_refusal_n"] == 4 and paranoid["flip_rate_n"] == 4
    assert rows["strong"]["state"] == "complete" and rows["strong"]["benign"] == "within"
    # Strong refuses no benign prompt: after 12 of 24 the rest could not break the limit.
    assert rows["strong"]["benign_refusal_n"] == 12


class OverByOneModel(ScriptedModel):
    """The scripted model, but "OVER" refuses every harmful prompt and the benign prompts with
    an even number and number 1: 13 of 24, one more than a 50% limit allows."""

    def generate_batches(self, prompts, decoding):
        for indices, answers in super().generate_batches(prompts, decoding):
            for i in indices:
                text = prompts[i]
                found = re.search(r"benign request (\d+)", text)
                number = int(found.group(1)) if found else -1
                if "OVER" in text and ("harmful" in text or number % 2 == 0 or number == 1):
                    answers[i] = [Generation("I can't help with that.", (1,), "stop")]
            yield indices, answers


def test_a_context_over_the_limit_only_on_the_whole_set_stops_before_the_rest_of_the_pool(
    tiny_model, tmp_path
):
    """More refusals than the limit allows of the whole set stop a trial for certain, where
    the 95% bound cannot (13 of 24 is barely over 50%): it is stopped once every benign prompt
    is measured, before it spends the rest of the harmful pool."""
    from flipsearch import GenerationCache
    from flipsearch.fliprate import Rate

    benign = [Prompt(f"b{i}", "benign", "c", f"benign request {i}") for i in range(24)]
    seeds = [Context("over", "OVER the top."), SEEDS[0]]
    settings = _settings(p_threshold=0.0, eta=1)
    evaluator = Evaluator(
        tiny_model,
        decoding=Decoding(max_new_tokens=4),
        generator=OverByOneModel(),
        cache=GenerationCache(tmp_path / "g.sqlite"),
    )
    study, _ = open_study(settings, optuna.storages.InMemoryStorage())
    enqueue_seeds(study, seeds)
    objective = ContextObjective(evaluator, seeds, load_grammar(), HARMFUL, benign, settings)
    study.optimize(objective, n_trials=2)
    rows = {r["context"]: r for r in trial_rows(study)}
    over = rows["over"]
    assert over["benign_refusal_count"] == 13 and over["benign_refusal_n"] == 24
    assert Rate.of(13, 24).low < 0.5  # not "surely over" by the interval...
    assert over["state"] == "pruned" and over["benign"] == "stopped"  # ... but certainly over
    assert over["flip_rate_n"] == settings.prune_every  # the rest of the pool was not spent
    assert rows["strong"]["state"] == "complete"


def test_screening_runs_the_strongest_seeds_first_at_no_extra_cost(tiny_model, tmp_path):
    settings = _settings()
    evaluator = _evaluator(tiny_model, tmp_path)
    objective = ContextObjective(evaluator, SEEDS, load_grammar(), HARMFUL, BENIGN, settings)
    order = objective.screen(list(reversed(SEEDS)))
    assert {c.id for c in order[:2]} == {"strong", "paranoid"}  # they flip every prompt
    screened = evaluator.generated["teacher"]
    assert screened == len(SEEDS) * settings.prune_every
    study, _ = open_study(settings, optuna.storages.InMemoryStorage())
    enqueue_seeds(study, order)
    study.optimize(objective, n_trials=len(SEEDS))
    rows = {r["context"]: r for r in trial_rows(study)}
    for i in range(4):  # pruned at the first check: the screened chunk, nothing generated
        assert rows[f"none{i}"]["state"] == "pruned"
        assert rows[f"none{i}"]["flip_rate_n"] == settings.prune_every
    nones = [t for t in study.trials if str(t.user_attrs["seed_id"]).startswith("none")]
    # A trial counts the answers it used, wherever they came from: the screened chunk here...
    assert all(t.user_attrs["teacher_generations"] == settings.prune_every for t in nones)
    # ... and the screen cost nothing beyond what the trials used.
    used = sum(t.user_attrs["teacher_generations"] for t in study.trials)
    assert evaluator.generated["teacher"] == used


def test_multi_objective_gives_a_pareto_front_without_pruning(tiny_model, tmp_path):
    _, rows, _ = _search(tiny_model, tmp_path, multi_objective=True)
    assert all(r["state"] == "complete" for r in rows.values())
    assert rows["strong"]["pareto"] is True  # flips everything at no benign cost
    assert rows["paranoid"]["pareto"] is False  # dominated by "strong"


def _cli(*args):
    return [sys.executable, "-m", "flipsearch.cli", *map(str, args)]


def _tiny_run_args(tiny_model_dir, out, *extra):
    return ["run", *tiny_cli_args(tiny_model_dir, out, limit=12), *extra]


def _finished(storage_url: str, study: str = "flipsearch"):
    from flipsearch.search import open_storage

    storage = open_storage(storage_url, None)
    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    return trials


def _check_no_lost_or_duplicated(trials, expected: int, workers: int = 1):
    finished = [
        t
        for t in trials
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    assert expected <= len(finished) <= expected + workers - 1
    assert len({t.number for t in trials}) == len(trials)
    seeds = [t.user_attrs["seed_id"] for t in finished if "seed_id" in t.user_attrs]
    assert len(seeds) == len(set(seeds)), "a seed context was evaluated twice"
    return finished, seeds


def _two_workers(tiny_model_dir, tmp_path, storage, study):
    """Two worker processes on one study; returns the study's finished trials and seed ids."""
    workers = [
        subprocess.Popen(
            _cli(
                *_tiny_run_args(
                    tiny_model_dir,
                    tmp_path / f"w{i}",
                    "--trials",
                    "30",
                    "--storage",
                    storage,
                    "--study",
                    study,
                    "--trials-in-flight",
                    "4",
                )
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err
    finished, seeds = _check_no_lost_or_duplicated(_finished(str(storage), study), 30, 2)
    assert len(seeds) == 26  # every seed context ran exactly once, across both workers
    return finished


def test_two_workers_share_one_journal_study(tiny_model_dir, tmp_path):
    finished = _two_workers(tiny_model_dir, tmp_path, tmp_path / "shared.journal", "shared")
    assert len({t.user_attrs["worker"] for t in finished}) == 2


def test_killed_run_resumes_without_lost_or_duplicated_trials(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = _cli(*_tiny_run_args(tiny_model_dir, out, "--trials", "40"))
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / "study.journal"
    deadline = time.time() + 300
    while time.time() < deadline:
        time.sleep(0.2)
        if journal.exists():
            try:
                states = [t.state for t in _finished(str(journal))]
            except KeyError:  # the journal is open, the study not created yet (screening)
                continue
            if sum(s.is_finished() for s in states) >= 5:
                break
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = [t for t in _finished(str(journal)) if t.state.is_finished()]
    assert 5 <= len(before) < 40
    resumed = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    trials = _finished(str(journal))
    finished, seeds = _check_no_lost_or_duplicated(trials, 40)
    assert len(seeds) == 26  # none lost, none twice
    kept = {t.number: t.params for t in before if t.state != optuna.trial.TrialState.FAIL}
    for number, params in kept.items():  # finished trials were kept as they were
        assert trials[number].params == params
    info = json.loads((out / "run.json").read_text())
    assert info["study"]["finished"] == len(finished)
    leaderboard = pd.read_csv(out / "leaderboard.csv")
    assert {"state", "trial", "source"} <= set(leaderboard)


def test_rerun_of_a_finished_search_generates_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = _cli(*_tiny_run_args(tiny_model_dir, out, "--trials", "30"))
    assert subprocess.run(args, capture_output=True, text=True, timeout=600).returncode == 0
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert "generated 0 student and 0 teacher prompts" in again.stdout


def test_run_api_searches_and_reports_importances(tiny_model_dir, tmp_path):
    result = run(
        RunConfig(
            out=str(tmp_path / "r"),
            model=str(tiny_model_dir),
            limit=12,
            max_new_tokens=4,
            dtype="fp32",
            trials=45,
        )
    )
    assert result.info["study"]["finished"] == 45
    assert result.info["history"][-1]["source"] == "grammar"
    assert set(result.info["importances"]) <= {
        "length",
        "role",
        "watch_for",
        "decide",
        "refuse",
        "example",
        "helpful",
        "tone",
        "placement",
    }
    finalists = result.leaderboard.dropna(subset=["holdout_flip_rate"])
    assert len(finalists) == 3  # top_k: each re-scored on every benign prompt of each split
    assert (finalists["benign"] == "measured").all()
    counts = result.info["prompt_counts"]
    assert counts["benign"] + counts["benign_holdout"] + counts["benign_final"] == 12
    assert (finalists["benign_refusal_n"] == counts["benign"]).all()
    assert (finalists["holdout_benign_refusal_n"] == counts["benign_holdout"]).all()


def test_two_workers_share_one_postgresql_study(tiny_model_dir, tmp_path, postgres_url):
    _two_workers(tiny_model_dir, tmp_path, postgres_url, "pg")
    info = json.loads((tmp_path / "w0" / "run.json").read_text())
    assert "postgresql" in info["study"]["storage"]


def test_a_pruned_trial_reports_its_running_mean_last(tiny_model, tmp_path):
    """TPE ranks a pruned trial by its last intermediate value: that is its running mean (not
    the flip of the last prompt it saw), at a step after every prompt's step."""
    study, rows, _ = _search(tiny_model, tmp_path)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned
    for trial in pruned:
        last = max(trial.intermediate_values)
        assert last == MEAN_STEP > len(HARMFUL)  # past the search split's indices 0..n-1
        row = rows[trial.user_attrs["row"]["context"]]
        assert trial.intermediate_values[last] == pytest.approx(row["flip_rate"])


def test_a_trial_killed_before_it_named_its_worker_is_taken_back(tmp_path):
    """Between Optuna's ask (RUNNING) and the objective recording its worker there is a window;
    a trial killed there goes back to the queue when no other worker may own it."""
    import socket

    from flipsearch.search import open_storage, recover_stale_trials

    storage = open_storage(None, tmp_path)
    dead = f"worker:{socket.gethostname()}:999999999"
    for name, workers, taken_back in (("alone", [dead], 1), ("shared", [dead, "worker:far:1"], 0)):
        study = optuna.create_study(storage=storage, study_name=name)
        for worker in workers:
            study.set_user_attr(worker, 0.0)
        study.enqueue_trial({}, user_attrs={"seed_id": "a"})
        orphan = study.ask()  # RUNNING, no worker recorded: its process was killed right here
        # A live worker on another machine might own it: left alone (for a minute).
        assert recover_stale_trials(study, storage) == taken_back
        if taken_back:
            again = optuna.load_study(study_name=name, storage=storage).ask()
            assert again.number == orphan.number and again.user_attrs["seed_id"] == "a"
