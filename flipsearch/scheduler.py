"""Many trials in flight, their chunks served by shared generation calls.

A trial of ``ContextObjective`` is a sequence of steps that wait for answers. The scheduler
asks Optuna for trials (``study.ask``; TPE's constant liar keeps it from drawing a trial in
flight twice) until ``in_flight`` run side by side, gathers every trial's next chunk (harmful
or benign) into one ``Evaluator.judged_many`` call, and tops the call up to a multiple of the
batch size with the prompts the leading trials will ask for next, so the backend sees full
batches. Then every trial reports its chunk, and only then does any of them ask the pruner,
so a round's decisions do not depend on the order the trials are stepped in. Answers do not
depend on their batch company, so a context gets the same verdicts whatever ran beside it;
what concurrency changes is which trials the pruner has seen when it decides.

The search stops when the study has its trials, or at a budget of teacher generations, or at
a deadline; trials still in flight then go back to the queue (Optuna's WAITING state, their
answers cached), so a later run resumes them first. Ctrl-C does the same.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from flipsearch.search import (
    CHECK,
    FINISHED,
    ContextObjective,
    Flight,
    best_feasible_trial,
    finished_trials,
    requeue,
    trial_line,
)


@dataclass
class Limits:
    """When the search stops and how much it runs at once."""

    trials: int  # finished trials the study should hold
    in_flight: int = 1
    batch_size: int = 64
    budget_generations: int | None = None  # teacher generations the study's trials may use
    deadline: float | None = None  # a time.time() after which no new round starts


class Monitor:
    """What the scheduler tells its caller; every method may be left as it is."""

    def started(self, flight: Flight) -> None:
        """A trial was asked for and its context chosen."""

    def round_done(self, flights: Sequence[Flight]) -> None:
        """A shared call was served; ``flights`` are the trials still in flight."""

    def finished(self, flight: Flight) -> None:
        """A trial finished (complete or pruned) and was told to the study."""


def spent_generations(study: optuna.Study, flights: Sequence[Flight], samples: int) -> int:
    """Teacher generations the study's finished trials and the trials in flight used (cached
    or not: a resumed run counts what an uninterrupted one would)."""
    done = sum(
        int(t.user_attrs.get("teacher_generations") or 0)
        for t in study.get_trials(deepcopy=False, states=FINISHED)
    )
    return done + sum(f.teacher_generations for f in flights) * samples


def run_trials(
    study: optuna.Study,
    storage: Any,
    objective: ContextObjective,
    limits: Limits,
    monitor: Monitor | None = None,
    before_ask: Callable[[], None] | None = None,
) -> str | None:
    """Run trials until ``limits`` say stop; returns why it stopped early (``"budget"``,
    ``"timeout"``) or None when the study has its trials."""
    monitor = monitor or Monitor()
    flights: list[Flight] = []
    try:
        with warnings.catch_warnings():
            # A re-queued trial reports its first steps again (same prompts, same answers).
            warnings.filterwarnings("ignore", message="The reported value is ignored")
            while True:
                reason = _stop_reason(study, flights, objective, limits)
                if reason is not None:
                    _requeue_all(study, storage, flights)
                    return reason
                while len(flights) < max(1, limits.in_flight) and _room(study, limits):
                    if before_ask is not None:
                        before_ask()
                    trial = study.ask()
                    try:
                        flight = objective.start(trial)
                    except Exception:
                        study.tell(trial, state=TrialState.FAIL)
                        raise
                    flights.append(flight)
                    monitor.started(flight)
                    _step(study, objective, flight, flights, monitor)
                if not flights:
                    return None
                _serve(objective, flights, limits.batch_size)
                for flight in list(flights):
                    _step(study, objective, flight, flights, monitor)
                for flight in [f for f in flights if f.waiting == CHECK]:
                    _step(study, objective, flight, flights, monitor)
                monitor.round_done(flights)
    except BaseException:
        _requeue_all(study, storage, flights)
        raise


def _room(study: optuna.Study, limits: Limits) -> bool:
    """Another trial fits: the study's finished and running trials (every worker's) are
    fewer than it should hold."""
    started = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
    return len(started) < limits.trials


def _stop_reason(
    study: optuna.Study, flights: Sequence[Flight], objective: ContextObjective, limits: Limits
) -> str | None:
    if limits.deadline is not None and time.time() >= limits.deadline:
        return "timeout"
    if limits.budget_generations is not None:
        samples = objective.evaluator.decoding.samples
        if spent_generations(study, flights, samples) >= limits.budget_generations:
            return "budget"
    return None


def _step(
    study: optuna.Study,
    objective: ContextObjective,
    flight: Flight,
    flights: list[Flight],
    monitor: Monitor,
) -> None:
    """Run the trial to what it waits for next; a trial that ends is told to the study."""
    try:
        flight.waiting = flight.steps.send(None)
        return
    except StopIteration as done:
        state, values = TrialState.COMPLETE, done.value
    except optuna.TrialPruned:
        state, values = TrialState.PRUNED, None
    except Exception:
        flights.remove(flight)
        objective.finish(flight)
        study.tell(flight.trial, state=TrialState.FAIL)
        raise
    flights.remove(flight)
    objective.finish(flight)  # its cost, before the trial is closed to changes
    study.tell(flight.trial, values, state=state)
    monitor.finished(flight)


def _serve(objective: ContextObjective, flights: Sequence[Flight], batch_size: int) -> None:
    """One generation call for every trial's next chunk, filled to whole batches."""
    needs = [n for f in flights if isinstance(f.waiting, list) for n in f.waiting]
    if not needs:
        return
    evaluator = objective.evaluator
    asked = {(p.id, n.context.id) for n in needs for p in n.prompts}
    missing = len(
        {
            (p.id, n.context.id)
            for n in needs
            for p in n.prompts
            if not evaluator.is_answered(p, n.context)
        }
    )
    room = math.ceil(missing / batch_size) * batch_size - missing if missing else 0
    extra: list[tuple[list[Any], Any]] = []
    # The leading trials' next prompts are the likeliest to be asked for; a trial behind them
    # is likely to be pruned, so its later prompts would be generated for nothing.
    most = max(f.flips for f in flights)
    for flight in [f for f in flights if f.flips == most]:
        for later in objective.lookahead(flight):
            if room <= 0:
                break
            take = [
                p
                for p in later.prompts
                if (p.id, later.context.id) not in asked
                and not evaluator.is_answered(p, later.context)
            ][:room]
            asked.update((p.id, later.context.id) for p in take)
            room -= len(take)
            if take:
                extra.append((take, later.context))
    contexts = len({n.context.id for n in needs})
    evaluator.judged_many(
        [(n.prompts, n.context, n.role) for n in needs],
        also_generate=extra,
        what=f"prompts of {contexts} trial(s)",
    )


def _requeue_all(study: optuna.Study, storage: Any, flights: list[Flight]) -> None:
    """Trials in flight back to the queue, their cost recorded (they resume first)."""
    for flight in flights:
        requeue(study, storage, flight.trial.number)
    flights.clear()


class ProgressMonitor(Monitor):
    """One live line per trial in flight (context, prompts scored, flips, state) and one for
    the best feasible context so far, under rich's progress display; outside a terminal only
    a line per finished trial (a live line there would print nothing)."""

    def __init__(self, progress: Any, study: optuna.Study, total: int, pool: int) -> None:
        from flipsearch.progress import LineProgress

        self.progress, self.study, self.pool = progress, study, pool
        self.live = not isinstance(progress, LineProgress)
        done = min(finished_trials(study), total)
        self.task = progress.add_task("search trials", total=total, completed=done)
        self.lines: dict[int, Any] = {}
        self.best = progress.add_task(self._best(), total=None) if self.live else None

    def started(self, flight: Flight) -> None:
        if self.live:
            self.lines[flight.trial.number] = self.progress.add_task(
                describe(flight, "starting"), total=self.pool
            )

    def round_done(self, flights: Sequence[Flight]) -> None:
        if not self.live:
            return
        for flight in flights:
            task = self.lines.get(flight.trial.number)
            if task is not None:
                self.progress.update(
                    task, description=describe(flight), completed=len(flight.outcomes)
                )

    def finished(self, flight: Flight) -> None:
        task = self.lines.pop(flight.trial.number, None)
        if task is not None:
            self.progress.remove_task(task)
        self.progress.console.print(trial_line(flight.trial), highlight=False)
        self.progress.update(self.task, completed=finished_trials(self.study))
        if self.best is not None:
            self.progress.update(self.best, description=self._best())

    def _best(self) -> str:
        best = best_feasible_trial(self.study)
        if best is None:
            return "best feasible: none complete yet"
        row = best.user_attrs.get("row") or {}
        return (
            f"best feasible: {row.get('context')} (trial {best.number}), flip rate {best.value:.1%}"
        )


def describe(flight: Flight, state: str | None = None) -> str:
    """A trial in flight in one line: its context, what it measured, what it is doing."""
    text = f"trial {flight.trial.number} {flight.context.id}: {flight.flips:g} flips"
    if flight.benign:
        refused = sum(j.refusal_share for j in flight.benign)
        text += f", benign refusal {refused:g}/{len(flight.benign)}"
    if state is None:
        waiting = flight.waiting
        roles = {n.role for n in waiting} if isinstance(waiting, list) else set()
        state = "benign prompts" if roles == {"refusal"} else "harmful prompts"
    return f"{text} ({state})"
