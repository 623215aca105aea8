"""Trials in flight: shared, filled generation calls; verdicts independent of company; budget
and timeout stops that lose nothing; live progress lines."""

from __future__ import annotations

import io
import time

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import Progress

from flipsearch import Decoding, Evaluator, GenerationCache, RunConfig, run
from flipsearch.grammar import load_grammar
from flipsearch.progress import LineProgress
from flipsearch.scheduler import (
    Limits,
    ProgressMonitor,
    _likely_next,
    _serve,
    describe,
    run_trials,
    spent_generations,
)
from flipsearch.search import CHECK, ContextObjective, enqueue_seeds, open_study, trial_rows
from tests.test_search import BENIGN, HARMFUL, SEEDS, ScriptedModel, _settings


class CountingModel(ScriptedModel):
    """The scripted model, recording how many prompts each call brought."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def generate_batches(self, prompts, decoding):
        self.calls.append(len(prompts))
        yield from super().generate_batches(prompts, decoding)


def _objective(tiny_model, tmp_path, name, settings, model=None):
    evaluator = Evaluator(
        tiny_model,
        decoding=Decoding(max_new_tokens=4),
        generator=model or ScriptedModel(),
        cache=GenerationCache(tmp_path / f"{name}.sqlite"),
    )
    return ContextObjective(evaluator, SEEDS, load_grammar(), HARMFUL, BENIGN, settings)


def _study(settings, objective, storage=None):
    storage = storage or optuna.storages.InMemoryStorage()
    study, _ = open_study(settings, storage)
    enqueue_seeds(study, objective.screen(SEEDS))
    return study, storage


def _judged(objective):
    """Every (context, role, prompt) verdict the search made."""
    return {
        (key[0], key[1], key[2]): [
            v.unsafe if key[1] == "safety" else v.refusal for v in j.verdicts
        ]
        for key, j in objective.evaluator._memo.items()
        if key[0] is not None
    }


def test_trials_in_flight_share_calls_and_get_the_verdicts_they_get_alone(tiny_model, tmp_path):
    settings = _settings(trials=14, prune_every=4)
    alone = _objective(tiny_model, tmp_path, "alone", settings)
    study_alone, storage_alone = _study(settings, alone)
    assert run_trials(study_alone, storage_alone, alone, Limits(14, in_flight=1)) is None
    model = CountingModel()
    shared = _objective(tiny_model, tmp_path, "shared", settings, model)
    study, storage = _study(settings, shared)
    screened = len(model.calls)
    assert run_trials(study, storage, shared, Limits(14, in_flight=6, batch_size=16)) is None
    # The same verdict for every answer both searches judged, whatever ran beside it.
    one, many = _judged(alone), _judged(shared)
    common = set(one) & set(many)
    assert len(common) > len(SEEDS) * settings.prune_every
    assert all(one[k] == many[k] for k in common)
    # Every trial once, none lost, none twice; every seed ran.
    for s in (study_alone, study):
        trials = s.get_trials(deepcopy=False)
        assert len(trials) == 14 and all(t.state.is_finished() for t in trials)
        assert sorted(t.user_attrs["seed_id"] for t in trials if "seed_id" in t.user_attrs) == (
            sorted(c.id for c in SEEDS)
        )
    # The calls after the screen came in whole batches of 16 (topped up with what the
    # leading trials ask for next), but for a last call with nothing left to add.
    after = [n for n in model.calls[screened:] if n]  # (an all-cached call brings none)
    assert after and all(n % 16 == 0 for n in after[:-1]), str(after)
    assert shared.evaluator.calls[-len(after) :] == [("teacher", n) for n in after]

    # Every seed got the verdict it got alone: its state, its counts, why it was pruned.
    def verdicts(s):
        return {
            t.user_attrs["seed_id"]: (
                t.state,
                t.user_attrs["row"]["flip_rate_count"],
                t.user_attrs["row"]["flip_rate_n"],
                t.user_attrs["row"].get("pruned_by"),
            )
            for t in s.get_trials(deepcopy=False)
            if "seed_id" in t.user_attrs
        }

    assert verdicts(study) == verdicts(study_alone)
    assert {state for state, *_ in verdicts(study).values()} == {
        TrialState.COMPLETE,
        TrialState.PRUNED,
    }
    # The ranking agrees: the strongest feasible context wins both ways.
    for s in (study_alone, study):
        complete = [r for r in trial_rows(s) if r.state == "complete"]
        best = max(complete, key=lambda r: (r.feasible(0.5), r.flip_rate))
        assert best.context.id == "strong"


def test_a_call_is_filled_with_what_the_trials_will_likely_ask_for(tiny_model, tmp_path):
    settings = _settings(trials=3, prune_every=4)
    objective = _objective(tiny_model, tmp_path, "fill", settings)
    study, _ = open_study(settings, optuna.storages.InMemoryStorage())
    strong, none0, paranoid = SEEDS[0], SEEDS[6], SEEDS[1]
    enqueue_seeds(study, [strong, none0, paranoid])
    flights = [objective.start(study.ask()) for _ in range(3)]
    for flight in flights:
        flight.waiting = flight.steps.send(None)
    _serve(objective, flights, batch_size=1)  # their first chunks, nothing added
    for flight in flights:
        flight.waiting = flight.steps.send(None)
    assert [f.waiting for f in flights] == [CHECK] * 3  # all reported, none checked yet
    order = [n for n in _likely_next(objective, flights) if n.prompts]
    owners = [n.context.id for n in order]
    # The first trial has nothing earlier to prune it: its benign prompts come first...
    assert owners[0] == "strong" and order[0].role == "refusal"
    # ... then the later trial its check will keep (it flips as much), and last the one a
    # paired test already says flips less than the first (0 of 4 against 4 of 4).
    later = [c for c in owners if c != "strong"]
    assert later[0] == "paranoid" and owners.index("none0") > owners.index("paranoid")
    assert objective.behind(flights[1], flights[0]) < settings.p_threshold
    assert objective.behind(flights[2], flights[0]) == 1.0


def test_a_budget_stop_puts_the_trials_in_flight_back_and_a_rerun_finishes(tiny_model, tmp_path):
    settings = _settings(trials=14, prune_every=4)
    whole = _objective(tiny_model, tmp_path, "whole", settings)
    whole_study, whole_storage = _study(settings, whole)
    run_trials(whole_study, whole_storage, whole, Limits(14, in_flight=4, batch_size=8))
    needed = spent_generations(whole_study, [], 1)  # what the search uses without a budget
    objective = _objective(tiny_model, tmp_path, "b", settings)
    study, storage = _study(settings, objective)
    limits = Limits(14, in_flight=4, batch_size=8, budget_generations=needed * 3 // 4)
    assert run_trials(study, storage, objective, limits) == "budget"
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert TrialState.RUNNING not in states and TrialState.FAIL not in states
    assert TrialState.WAITING in states  # in flight at the stop: back in the queue
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    assert 0 < len(finished) < 14
    # Counted: what the finished trials used (the re-queued ones count when they finish).
    assert spent_generations(study, [], 1) == sum(
        t.user_attrs["teacher_generations"] for t in finished
    )
    # Run again without the budget: the queued trials first, then the rest; nothing twice.
    again = _objective(tiny_model, tmp_path, "b", settings)
    assert run_trials(study, storage, again, Limits(14, in_flight=4, batch_size=8)) is None
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 14 and all(t.state.is_finished() for t in trials)
    seeds = [t.user_attrs["seed_id"] for t in trials if "seed_id" in t.user_attrs]
    assert sorted(seeds) == sorted(c.id for c in SEEDS)


def test_a_deadline_stops_before_the_next_call(tiny_model, tmp_path):
    settings = _settings(trials=14, prune_every=4)
    objective = _objective(tiny_model, tmp_path, "t", settings)
    study, storage = _study(settings, objective)
    limits = Limits(14, in_flight=4, deadline=time.time() - 1)
    assert run_trials(study, storage, objective, limits) == "timeout"
    assert all(t.state == TrialState.WAITING for t in study.get_trials(deepcopy=False))


def test_an_error_in_a_trial_fails_only_that_trial_and_requeues_the_others(tiny_model, tmp_path):
    class Broken(ScriptedModel):
        def generate_batches(self, prompts, decoding):
            if any("STRONG" in p for p in prompts):
                raise RuntimeError("the engine fell over")
            yield from super().generate_batches(prompts, decoding)

    settings = _settings(trials=14, prune_every=4)
    objective = _objective(tiny_model, tmp_path, "e", settings)
    study, storage = _study(settings, objective)
    objective.evaluator.generator = Broken()
    with pytest.raises(RuntimeError, match="fell over"):
        run_trials(study, storage, objective, Limits(14, in_flight=4, batch_size=4))
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert TrialState.RUNNING not in states


def test_progress_shows_a_line_per_trial_in_flight_and_the_best_so_far(tiny_model, tmp_path):
    settings = _settings(trials=14, prune_every=4)
    objective = _objective(tiny_model, tmp_path, "p", settings)
    study, storage = _study(settings, objective)
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    seen: list[set[str]] = []

    class Watching(ProgressMonitor):
        def round_done(self, flights):
            super().round_done(flights)
            seen.append({t.description for t in progress.tasks})

    with Progress(console=console) as progress:
        monitor = Watching(progress, study, 14, len(objective.pool))
        run_trials(study, storage, objective, Limits(14, in_flight=4, batch_size=8), monitor)
    lines = set().union(*seen)
    assert any(line.startswith("trial ") and "flips" in line for line in lines)
    assert any(line.startswith("best feasible: strong") for line in lines)
    assert console.file.getvalue().count("(pruned)") >= 1


def test_outside_a_terminal_each_finished_trial_is_one_line(tiny_model, tmp_path):
    settings = _settings(trials=14, prune_every=4)
    objective = _objective(tiny_model, tmp_path, "l", settings)
    study, storage = _study(settings, objective)
    console = Console(file=io.StringIO(), force_terminal=False, width=200)
    progress = LineProgress(console)
    monitor = ProgressMonitor(progress, study, 14, len(objective.pool))
    run_trials(study, storage, objective, Limits(14, in_flight=4, batch_size=8), monitor)
    text = console.file.getvalue()
    assert sum(line.startswith("trial ") for line in text.splitlines()) == 14


def test_describe_names_context_flips_and_state(tiny_model, tmp_path):
    settings = _settings(trials=1, prune_every=4)
    objective = _objective(tiny_model, tmp_path, "d", settings)
    study, _ = _study(settings, objective)
    flight = objective.start(study.ask())
    flight.waiting = next(flight.steps)
    assert describe(flight).startswith(f"trial 0 {flight.context.id}: 0 flips")
    assert describe(flight).endswith("(harmful prompts)")


def test_a_run_stopped_by_its_budget_is_complete_and_resumes(tiny_model_dir, tmp_path):
    config = dict(
        out=str(tmp_path / "r"),
        model=str(tiny_model_dir),
        limit=12,
        max_new_tokens=4,
        dtype="fp32",
        trials=30,
    )
    first = run(RunConfig(**config, budget_generations=100))
    assert first.info["study"]["stopped"] == "budget"
    assert first.report_path.is_file() and (tmp_path / "r" / "leaderboard.csv").is_file()
    assert "stopped by its generation budget" in first.report_path.read_text()
    assert first.info["study"]["finished"] < 30
    second = run(RunConfig(**config))
    assert second.info["study"]["stopped"] is None and second.info["study"]["finished"] == 30
    assert second.info["study"]["teacher_generations"] >= first.info["study"]["teacher_generations"]
