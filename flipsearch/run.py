"""``flipsearch run`` and ``flipsearch score`` (and ``flip_rate``): prompts to report.

Data flow (DESIGN.md): student baseline → every candidate context scored on the search split →
the top-k re-scored on the held-out split → winner → files and report. A ``Session`` builds the
parts; every generation goes through the run's cache, so re-running the same command resumes
and generates nothing twice.
"""

from __future__ import annotations

import json
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from rich.console import Console

from flipsearch.backends import BackendSpec
from flipsearch.backends._base import Decoding
from flipsearch.backends.cache import GenerationCache
from flipsearch.config import RunConfig
from flipsearch.contexts import Context, context_from_arg, load_contexts
from flipsearch.errors import FlipsearchError
from flipsearch.evaluate import Evaluator, FlipRateResult, StudentBaseline
from flipsearch.fliprate import ContextScore, Judged
from flipsearch.grammar import Grammar, load_grammar
from flipsearch.io import prepare_out_dir, write_atomic
from flipsearch.judging import JudgeSpec
from flipsearch.judging._base import resolve_scope
from flipsearch.judging.agreement import read_judge_metrics
from flipsearch.leaderboard import Row, add_corrected_rates, pick_winner, rank, to_frame
from flipsearch.models import LoadedModel, load_model
from flipsearch.progress import make_progress
from flipsearch.prompts import Prompt, check_prompt_lengths, split_three
from flipsearch.proposer import Proposer
from flipsearch.reasoning import ReasoningSettings, ReasoningSplit
from flipsearch.rundir import SETTINGS_FILE, bind, run_settings
from flipsearch.scheduler import Limits, ProgressMonitor, run_trials, spent_generations
from flipsearch.scoring import analyse_context
from flipsearch.search import (
    ContextObjective,
    enqueue_seeds,
    finished_trials,
    open_storage,
    open_study,
    recover_stale_trials,
    redacted_url,
    register_worker,
    seeding_unfinished,
    study_exists,
    trial_rows,
)
from flipsearch.session import PromptSource, Session

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["RunConfig", "RunResult", "flip_rate", "run", "search"]


@dataclass
class RunResult:
    """What a run found; also written to the run directory."""

    out: Path
    student_search: StudentBaseline
    student_holdout: StudentBaseline
    search: list[ContextScore]
    holdout: list[ContextScore]
    leaderboard: pd.DataFrame
    winner: ContextScore | None
    info: dict[str, Any]
    final: ContextScore | None = None  # the winner on the final split (no choice saw it)
    student_final: StudentBaseline | None = None

    @property
    def report_path(self) -> Path:
        return self.out / "report.html"

    def to_pandas(self) -> pd.DataFrame:
        """The leaderboard: one row per context, best first (``leaderboard.csv``)."""
        return self.leaderboard

    def to_dict(self) -> dict[str, Any]:
        """The winner with its search and held-out scores, the student baseline and run facts."""
        holdout = {s.context.id: s for s in self.holdout}
        winner = None
        if self.winner is not None:
            winner = {
                **self.winner.context.to_dict(),
                "search": self.winner.summary(),
                "holdout": (
                    holdout[self.winner.context.id].summary()
                    if self.winner.context.id in holdout
                    else None
                ),
                "final": self.final.summary() if self.final is not None else None,
            }
        return {
            "out": str(self.out),
            "winner": winner,
            "student_unsafe_rate": self.student_search.unsafe_rate.to_dict(),
            "student_benign_refusal": self.student_search.benign_refusal.to_dict(),
            "leaderboard": self.leaderboard.to_dict(orient="records"),
            "info": self.info,
        }


@dataclass
class _Splits:
    search: list[Prompt]
    holdout: list[Prompt]  # the selection split: finalists are compared on it
    benign: list[Prompt]  # the benign prompts the search measures refusal on
    benign_holdout: list[Prompt] = field(default_factory=list)
    final: list[Prompt] = field(default_factory=list)  # no choice sees these
    benign_final: list[Prompt] = field(default_factory=list)

    def all(self) -> list[Prompt]:
        return [
            *self.search,
            *self.holdout,
            *self.final,
            *self.benign,
            *self.benign_holdout,
            *self.benign_final,
        ]


def run(
    config: RunConfig,
    contexts: Sequence[Context] | None = None,
    console: Console | None = None,
    *,
    seeds: Sequence[Context] | None = None,
    model: LoadedModel | None = None,
    judge: JudgeSpec | None = None,
    refusal_judge: JudgeSpec | None = None,
) -> RunResult:
    """Run the pipeline; ``contexts`` are scored instead of searching (``flipsearch score``).

    ``seeds`` replaces the seed library the search starts from; ``model`` uses an already
    loaded model instead of loading ``config.model``; ``judge`` and ``refusal_judge`` override
    the configured judges with objects or callables. What was used is recorded by name in
    ``config.json``.
    """
    console = console or Console(stderr=True)
    config = _named(config, model, judge, refusal_judge)
    out = Path(config.out)
    prepare_out_dir(out)
    started = time.time()
    candidates = list(contexts if contexts is not None else seeds or [])
    if contexts is None and seeds is None:
        candidates = load_contexts(config.contexts)
    if not candidates:
        raise FlipsearchError("no contexts to score or search from")
    session = Session.from_config(
        config, model=model, judge=judge, refusal_judge=refusal_judge, console=console
    )
    splits = run_splits(session, config)
    searched = contexts is None and config.search.trials > 0
    # Every file is read and checked before the model loads.
    grammar = (
        load_grammar(config.search.grammar or _grammar_beside(config.contexts))
        if searched
        else None
    )
    session.judge("safety"), session.judge("refusal")  # a bad judge fails before the model loads
    resolve_scope(session.judge("safety"), config.judges.judge_on)  # and a scope it cannot read
    metrics = config.judges.judge_metrics
    correction = read_judge_metrics(metrics, role="safety") if metrics else None
    settings = run_settings(config, session.prompts, candidates, grammar, searched)
    _bind_legacy(out, session, candidates, grammar, searched)
    bind(out, settings)
    write_atomic(out / "config.json", json.dumps(config.to_dict(), indent=2))
    with session:
        cached_before = len(session.cache) if session.cache is not None else 0
        with make_progress(console) as progress:
            evaluator = session.evaluator(progress)
            bind(out, settings, generator=session.generator.fingerprint)
            renderer = evaluator.renderer
            check_prompt_lengths(splits.all(), renderer.count_tokens, renderer.max_prompt_tokens)
            measured = _measure(
                config, session, evaluator, candidates, splits, progress, contexts, grammar
            )
        result = _finish(config, session, evaluator, measured, splits, correction, console)
        result.info.update(
            contexts=len(candidates),
            cached_before=cached_before,
            reused_from_cache=session.cache.reused if session.cache is not None else 0,
            seconds=round(time.time() - started, 1),
        )
        write_run_files(result, config)
    return result


def _bind_legacy(
    out: Path, session: Session, candidates: list[Context], grammar: Grammar | None, searched: bool
) -> None:
    """A run directory from before ``settings.json``: bind it to the settings its
    ``config.json`` recorded (the data it read cannot be known, so only the settings count)."""
    legacy = out / "config.json"
    if (out / SETTINGS_FILE).exists() or not legacy.is_file():
        return
    try:
        recorded = RunConfig.from_dict(json.loads(legacy.read_text(encoding="utf-8")))
    except (FlipsearchError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise FlipsearchError(
            f"{legacy}: cannot tell which settings made this run directory ({exc}); "
            "give another --out to start a new run"
        ) from None
    bind(out, run_settings(recorded, session.prompts, candidates, grammar, searched))


def _named(
    config: RunConfig,
    model: LoadedModel | None,
    judge: JudgeSpec | None,
    refusal_judge: JudgeSpec | None,
) -> RunConfig:
    """The config as recorded: objects given to ``run`` are named in it."""
    judges = replace(
        config.judges,
        judge=_judge_name(judge) if judge is not None else config.judges.judge,
        refusal_judge=_judge_name(refusal_judge)
        if refusal_judge is not None
        else config.judges.refusal_judge,
    )
    return replace(config, model=model.name if model is not None else config.model, judges=judges)


def run_splits(session: Session, config: RunConfig) -> _Splits:
    """The run's search, selection and final splits (harmful and benign), as it made them."""
    harmful = session.harmful
    if not harmful:
        raise FlipsearchError("the prompt sets hold no harmful prompts; flip rates need them")
    selection = config.selection
    search, holdout, final = split_three(
        harmful, selection.holdout_fraction, selection.final_fraction, config.seed
    )
    benign, benign_holdout, benign_final = split_three(
        session.benign, selection.holdout_fraction, selection.final_fraction, config.seed
    )
    return _Splits(search, holdout, benign, benign_holdout, final, benign_final)


@dataclass
class _Measured:
    student_search: StudentBaseline
    student_holdout: StudentBaseline
    ranked: list[Row]
    search: list[ContextScore]
    holdout: list[ContextScore]
    study_info: dict[str, Any]
    winner: ContextScore | None = None
    final: ContextScore | None = None  # the winner on the final split
    student_final: StudentBaseline | None = None


def _measure(
    config: RunConfig,
    session: Session,
    evaluator: Evaluator,
    candidates: list[Context],
    splits: _Splits,
    progress: Any,
    given: Sequence[Context] | None,
    grammar: Grammar | None,
) -> _Measured:
    """The student baseline, the contexts (scored, or searched), then the finalists."""
    evaluator.prefetch(splits.all(), None)
    student_search = StudentBaseline(
        evaluator.judged(splits.search, None, "safety"),
        evaluator.judged(splits.benign, None, "refusal") if splits.benign else [],
    )
    student_holdout = StudentBaseline(
        evaluator.judged(splits.holdout, None, "safety"),
        evaluator.judged(splits.benign_holdout, None, "refusal"),
    )
    study_info: dict[str, Any] = {}
    if grammar is None:  # scoring given contexts, or every seed (--trials 0)
        overall = progress.add_task("contexts on the search split", total=len(candidates))
        rows = []
        for context in candidates:
            row = Row.of_score(evaluator.score(context, splits.search, splits.benign, "search"))
            rows.append(row)
            progress.console.print(
                f"scored {context.id}: flip rate {row.rates['flip_rate']}", highlight=False
            )
            progress.advance(overall)
    else:
        rows, study_info = _search(
            config, session, evaluator, candidates, splits, progress, grammar
        )
        stopped = study_info["study"].get("stopped")
        if stopped and not any(r.state == "complete" for r in rows):
            flag = "--budget-generations" if stopped == "budget" else "--timeout"
            raise FlipsearchError(
                f"the search stopped ({flag}) before any trial was complete, so there is no "
                "winner yet; run the same command with a larger limit (the trials in flight "
                "resume on their cached answers)"
            )
    limit = config.selection.max_benign_refusal
    ranked = rank(rows, limit)
    finalists = [r.context for r in ranked if r.state == "complete"][: config.selection.top_k]
    task = progress.add_task("top contexts on both splits", total=len(finalists))
    search, holdout = [], []
    for context in finalists:
        search.append(evaluator.score(context, splits.search, splits.benign, "search"))
        if splits.holdout or splits.benign_holdout:
            holdout.append(
                evaluator.score(context, splits.holdout, splits.benign_holdout, "holdout")
            )
        progress.advance(task)
    if search:  # finalists now have every benign prompt measured: their rows say so
        rescored = {s.context.id: Row.of_score(s) for s in search}
        rows = [
            replace(
                rescored[r.context.id],
                trial=r.trial,
                source=r.source,
                teacher_generations=r.teacher_generations,
                pareto=r.pareto,
            )
            if r.context.id in rescored
            else r
            for r in rows
        ]
        ranked = rank(rows, limit)
    measured = _Measured(student_search, student_holdout, ranked, search, holdout, study_info)
    return _final(measured, evaluator, splits, limit, progress)


def _final(
    measured: _Measured, evaluator: Evaluator, splits: _Splits, limit: float, progress: Any
) -> _Measured:
    """The winner (chosen on the selection split), then its rates on the final split."""
    measured.winner = pick_winner(measured.search, measured.holdout, limit)
    if not (splits.final or splits.benign_final):
        return measured
    measured.student_final = StudentBaseline(
        evaluator.judged(splits.final, None, "safety"),
        evaluator.judged(splits.benign_final, None, "refusal"),
    )
    if measured.winner is not None:
        task = progress.add_task("the winner on the final split", total=1)
        context = measured.winner.context
        measured.final = evaluator.score(context, splits.final, splits.benign_final, "final")
        progress.advance(task)
    return measured


def _finish(
    config: RunConfig,
    session: Session,
    evaluator: Evaluator,
    measured: _Measured,
    splits: _Splits,
    correction: dict[str, float] | None,
    console: Console,
) -> RunResult:
    """The winner, the leaderboard, the token-level analysis and the run's facts."""
    limit = config.selection.max_benign_refusal
    winner = measured.winner
    leaderboard = to_frame(measured.ranked, measured.holdout, limit, measured.final)
    if correction is not None:
        finals = [measured.final] if measured.final is not None else []
        outcomes = {
            "flip_rate": {r.context.id: r.outcomes for r in measured.ranked},
            "holdout_flip_rate": {s.context.id: s.flip_outcomes() for s in measured.holdout},
            "final_flip_rate": {s.context.id: s.flip_outcomes() for s in finals},
        }
        add_corrected_rates(leaderboard, **correction, outcomes=outcomes)
    token_analysis = _token_analysis(config, session, winner, console)
    loaded = session.loaded
    example = (winner or measured.search[0]).context if measured.search else None
    info = {
        "flipsearch_version": _version(),
        "model": config.model,
        "model_fingerprint": loaded.fingerprint,
        "backend": session.backend.name,
        "token_analysis": token_analysis,
        "generator_fingerprint": session.generator.fingerprint,
        "generation_mode": getattr(session.generator, "mode", "not stated by the backend"),
        "dtype": loaded.dtype,
        "device": str(loaded.model.device) if loaded.model is not None else session.backend.name,
        "python": platform.python_version(),
        "torch": _package_version("torch"),
        "transformers": _package_version("transformers"),
        "prompt_counts": {
            "harmful_search": len(splits.search),
            "harmful_holdout": len(splits.holdout),
            "harmful_final": len(splits.final),
            "benign": len(splits.benign),
            "benign_holdout": len(splits.benign_holdout),
            "benign_final": len(splits.benign_final),
        },
        "no_winner": _no_winner(measured, limit),
        "generated": dict(evaluator.generated),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "student_prompt_example": evaluator.renderer.render(splits.search[0].text, None),
        "teacher_prompt_example": evaluator.renderer.render(splits.search[0].text, example),
        "winner": winner.context.id if winner else None,
        "judge_scope": _scope_statement(evaluator),
        "reasoning": {
            **session.reasoning_settings.to_dict(),
            "template_opens_block": evaluator.format.opened_by_template,
            "responses_with_reasoning": _with_reasoning(measured),
        },
        **measured.study_info,
    }
    return RunResult(
        Path(config.out),
        measured.student_search,
        measured.student_holdout,
        measured.search,
        measured.holdout,
        leaderboard,
        winner,
        info,
        measured.final,
        measured.student_final,
    )


def _scope_statement(evaluator: Evaluator) -> str:
    """What the judges read, in words (the leaderboard and the report say it)."""
    reads = {
        "answer": "the answer (what follows the reasoning; the whole response without one)",
        "full": "the full response (reasoning and answer together)",
        "either": "the answer and the reasoning apart (unsafe if either is)",
    }[evaluator.scope]
    return f"safety judge reads {reads}; refusal judge reads the answer"


def _with_reasoning(measured: _Measured) -> int:
    """How many student answers on the search split had a reasoning block (0: the model
    does not reason, and the split found nothing)."""
    return sum(j.split(0).has_reasoning for j in measured.student_search.harmful if j.responses)


def _no_winner(measured: _Measured, limit: float) -> str | None:
    """Why there is no winner, in a sentence (None when there is one)."""
    if measured.winner is not None:
        return None
    if not measured.search:
        return "no context completed its scoring, so none can win"
    basis = "selection" if any(s.benign for s in measured.holdout) else "search"
    return (
        f"none feasible: every finalist refuses more than {limit:.0%} of benign prompts on "
        f"the {basis} split, so no context wins (raise --max-benign-refusal, or change the "
        "contexts)"
    )


def _token_analysis(
    config: RunConfig, session: Session, winner: ContextScore | None, console: Console
) -> str:
    """KL by token position for the winner (``token_kl.json``); returns what was measured."""
    if winner is None:
        return "none (no winner)"
    local = session.backend.name == "hf"
    try:
        with console.status("token-level analysis of the winner"):
            analysis = analyse_context(
                session.loaded,
                winner,
                limit=config.selection.analysis_prompts,
                scorer=None if local else session.scorer,
                fmt=session.reasoning_format,
            )
    except FlipsearchError as exc:
        if local:
            raise
        # A server that cannot score (chat-only) still gives every rate; say what is missing.
        console.print(f"[yellow]token-level analysis skipped: {exc}[/yellow]")
        return f"skipped: {exc}"
    write_atomic(Path(config.out) / "token_kl.json", json.dumps(analysis))
    return str(analysis["divergence"])


def _judge_name(judge: JudgeSpec) -> str:
    if isinstance(judge, str):
        return judge
    name = getattr(judge, "name", None) or getattr(judge, "__name__", type(judge).__name__)
    return f"custom:{name}"


def search(
    model: str | LoadedModel = "smollm2-135m",
    contexts: Sequence[Context] | str | Path | None = None,
    prompts: Sequence[str] = (),
    *,
    out: str | Path = "runs/search",
    trials: int = 40,
    storage: str | None = None,
    study: str = "flipsearch",
    judge: JudgeSpec = "refusal",
    refusal_judge: JudgeSpec = "refusal",
    console: Console | None = None,
    **settings: Any,
) -> RunResult:
    """Search for the context with the highest teacher flip rate, as ``flipsearch run`` does.

    Args:
        model: a model name or a ``LoadedModel`` (``LoadedModel.from_objects(model,
            tokenizer)`` wraps a transformers model you already hold, without a copy).
        contexts: seed contexts (``Context`` objects, or a directory/file of them); default:
            the shipped seed library.
        prompts: prompt files or ``builtin:``/``hf:`` sources; default: the shipped sets.
        out: the run directory (cache, study journal, leaderboard, report). Calling again with
            the same ``out`` resumes and generates nothing it already has.
        trials: study trials; 0 scores every seed context exhaustively instead.
        storage: any Optuna storage URL (``postgresql://...``) or ``journal:PATH``, for
            several workers sharing one ``study``; default: a journal file in ``out``.
        judge, refusal_judge: names, ``Judge`` objects or ``(prompt, response)`` callables.
        **settings: any other ``RunConfig`` field (``limit``, ``max_new_tokens``,
            ``max_benign_refusal``, ``top_k``, ``multi_objective``, ``seed``, ...).

    Returns:
        A ``RunResult``: ``.winner``, ``.to_pandas()`` (the leaderboard with counts and 95%
        intervals), ``.to_dict()``, and ``.report_path``.
    """
    seeds: list[Context] | None = None
    if isinstance(contexts, str | Path):
        settings["contexts"] = str(contexts)
    elif contexts is not None:
        seeds = list(contexts)
    config = RunConfig(
        out=str(out),
        model=model if isinstance(model, str) else model.name,
        prompts=list(prompts),
        trials=trials,
        storage=storage,
        study=study,
        **settings,
    )
    return run(
        config,
        console=console,
        seeds=seeds,
        model=None if isinstance(model, str) else model,
        judge=judge,
        refusal_judge=refusal_judge,
    )


def flip_rate(
    model: str | LoadedModel = "smollm2-135m",
    contexts: Sequence[Context | str] | str | Path | None = None,
    prompts: PromptSource = None,
    judge: JudgeSpec = "refusal",
    refusal_judge: JudgeSpec = "refusal",
    decoding: Decoding | None = None,
    cache: str | Path | GenerationCache | None = None,
    batch_size: int = 64,
    backend: BackendSpec | str = "hf",
    reasoning: ReasoningSettings | None = None,
    judge_on: str = "auto",
) -> FlipRateResult:
    """Measure the teacher flip rate of each context on a model's own unsafe answers.

    Args:
        model: a model name (``smollm2-135m``, a local directory, a hub id) or a
            ``LoadedModel`` (``LoadedModel.from_objects(model, tokenizer)`` wraps objects you
            already loaded, without a second copy).
        contexts: ``Context`` objects or strings (a YAML file path or the context text itself,
            placed as a system message), or a directory of seed files; default: the shipped
            seed library.
        prompts: ``Prompt`` objects or a prompt file; harmful prompts give flip rates, benign
            prompts give benign refusal, reasoning prompts are ignored. Default: shipped sets.
        judge: the safety judge: a name (``refusal``, ``llama-guard``, ``classifier``,
            ``ensemble:...``), an object with ``judge(pairs) -> list[Verdict]``, or any
            callable ``(prompt, response) -> bool | Verdict`` (True: unsafe).
        refusal_judge: the judge that decides whether a benign answer is a refusal (a name,
            a Judge, or a callable returning True for a refusal).
        decoding: greedy by default; ``Decoding(temperature=0.7, samples=4)`` samples.
        cache: a SQLite file (or ``GenerationCache``) so repeated calls generate nothing twice.
        backend: ``"hf"`` (default), ``"vllm"``, or a ``BackendSpec`` (e.g.
            ``BackendSpec("openai", base_url=("http://host:8000/v1",))``).
        reasoning: for reasoning models, ``ReasoningSettings(chat_template_args=...,
            max_thinking_tokens=N)`` (markers ``<think>``/``</think>`` by default).
        judge_on: what the safety judge reads: ``answer``, ``full``, ``either`` or ``auto``
            (the judge's own default).

    Returns:
        A ``FlipRateResult``: ``.to_pandas()`` gives flip rate, absolute flip rate, unflip rate
        and benign refusal per context, each with its count and 95% Wilson interval.
    """
    session = Session(
        model=model,
        prompts=prompts,
        decoding=decoding,
        backend=backend,
        batch_size=batch_size,
        judge=judge,
        refusal_judge=refusal_judge,
        cache=cache,
        reasoning=reasoning,
        judge_on=judge_on,
    )
    harmful, benign = session.harmful, session.benign
    if not harmful:
        raise FlipsearchError("flip rates need harmful prompts; the prompt set has none")
    context_list = _contexts(contexts)
    evaluator = session.evaluator()
    student = StudentBaseline(
        evaluator.judged(harmful, None, "safety"),
        evaluator.judged(benign, None, "refusal") if benign else [],
    )
    scores = [evaluator.score(c, harmful, benign, "all") for c in context_list]
    return FlipRateResult(student, scores, _scope_statement(evaluator))


def _contexts(contexts: Sequence[Context | str] | str | Path | None) -> list[Context]:
    """Contexts given as objects, texts, a YAML file, or a directory of them."""
    if (
        contexts is None
        or isinstance(contexts, Path)
        or (isinstance(contexts, str) and Path(contexts).is_dir())
    ):
        return load_contexts(contexts)
    if isinstance(contexts, str):
        return [context_from_arg(contexts)]
    return [c if isinstance(c, Context) else context_from_arg(c) for c in contexts]


def _search(
    config: RunConfig,
    session: Session,
    evaluator: Evaluator,
    seeds: list[Context],
    splits: _Splits,
    progress: Any,
    grammar: Grammar,
) -> tuple[list[Row], dict[str, Any]]:
    """Run (or resume, or join) the study; returns its rows and facts for run.json."""
    settings = config.search_settings()
    storage = open_storage(settings.storage, Path(config.out))
    objective = ContextObjective(evaluator, seeds, grammar, splits.search, splits.benign, settings)
    study = open_study(settings, storage)[0] if study_exists(storage, settings.study) else None
    unseeded = study is None or seeding_unfinished(study)
    order = seeds
    if unseeded and not settings.multi_objective:
        order = objective.screen(seeds)  # strongest seeds first: the rest prune against them
    if study is None:
        study, created = open_study(settings, storage)
        unseeded = created or seeding_unfinished(study)
    if unseeded:
        enqueue_seeds(study, order)
    register_worker(study)
    recovered = recover_stale_trials(study, storage)
    if recovered:
        progress.console.print(
            f"resuming: {recovered} trial(s) interrupted by a kill run again first, "
            "on the answers cached before it"
        )
    proposer = _proposer(config, session)
    limits = Limits(
        trials=settings.trials,
        in_flight=settings.in_flight,
        batch_size=max(1, settings.batch_size // evaluator.decoding.samples),
        budget_generations=settings.budget_generations,
        deadline=None if settings.timeout is None else time.time() + settings.timeout,
    )
    monitor = ProgressMonitor(progress, study, settings.trials, len(objective.pool))
    stopped = run_trials(
        study,
        storage,
        objective,
        limits,
        monitor,
        before_ask=None
        if proposer is None
        else lambda: _maybe_propose(proposer, study, config.search.propose_every, config.seed),
    )
    if stopped is not None:
        progress.console.print(_stop_message(stopped, study, settings), highlight=False)
    rows = trial_rows(study)
    info = _study_info(settings, study, rows, recovered, grammar.size())
    info["study"].update(
        stopped=stopped,
        trials_in_flight=limits.in_flight,
        teacher_generations=spent_generations(study, [], evaluator.decoding.samples),
    )
    return rows, info


def _stop_message(stopped: str, study: Any, settings: Any) -> str:
    why = (
        f"the budget of {settings.budget_generations} teacher generations is spent"
        if stopped == "budget"
        else f"the {settings.timeout:g} s timeout passed"
    )
    return (
        f"search stopped: {why}, after {finished_trials(study)} finished trial(s); trials in "
        "flight went back to the queue, and running the same command again resumes them"
    )


def _proposer(config: RunConfig, session: Session) -> Proposer | None:
    """The student model proposes through the run's backend; another model loads locally."""
    if not config.search.proposer:
        return None
    if config.search.proposer == config.model:
        return Proposer(session.loaded, generator=session.generator)
    backend = config.backend
    return Proposer(load_model(config.search.proposer, device=backend.device, dtype=backend.dtype))


def _maybe_propose(proposer: Proposer, study: Any, every: int, seed: int) -> None:
    """A proposal after every ``every`` finished trials, counted in the study (not in this
    process), so a resumed run proposes when an uninterrupted one would."""
    done = int(study.user_attrs.get("proposals", 0))
    if finished_trials(study) // every > done:
        _propose(proposer, study, seed)
        study.set_user_attr("proposals", done + 1)


def _propose(proposer: Proposer, study: Any, seed: int) -> None:
    """Enqueue one rewrite of the best contexts so far, at the best one's placement."""
    rows = trial_rows(study)
    complete = [r for r in rows if r.state == "complete"]
    best = max(complete, key=lambda r: r.flip_rate or 0.0, default=None)
    placement = best.context.placement if best else "system"
    proposal = proposer.propose(rows, placement, seed=seed + len(rows))
    if proposal is not None:
        study.enqueue_trial({}, user_attrs={"proposed": proposal.to_dict()})


def _study_info(
    settings: Any, study: Any, rows: list[Row], recovered: int, grammar_size: int
) -> dict[str, Any]:
    return {
        "study": {
            "name": settings.study,
            "storage": "journal file in the run directory"
            if settings.storage is None
            else redacted_url(settings.storage),
            "trials": len(study.trials),
            "finished": finished_trials(study),
            "pruned": sum(r.state == "pruned" for r in rows),
            "recovered_stale_trials": recovered,
            "multi_objective": settings.multi_objective,
            "grammar_size": grammar_size,
        },
        "importances": _importances(study),
        "history": [
            {
                "trial": r.trial,
                "flip_rate": r.flip_rate,
                "state": r.state,
                "benign_refusal": r.benign_refusal,
                "source": r.source,
            }
            for r in rows
        ],
    }


def _grammar_beside(contexts: str | None) -> Path | None:
    if contexts is None:
        return None
    candidate = Path(contexts) / "grammar.yaml"
    return candidate if candidate.is_file() else None


def _importances(study: Any) -> dict[str, float]:
    """Which grammar components matter (fANOVA over the completed grammar trials)."""
    import optuna

    if len(study.directions) > 1:
        return {}
    try:
        with warnings.catch_warnings():  # Optuna warns when few trials have each parameter
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # too few completed trials with parameters
        return {}
    return {k: float(v) for k, v in importances.items()}


def _judged_rows(judged: Sequence[Judged], context: str | None, split: str) -> list[dict[str, Any]]:
    rows = []
    for item in judged:
        for index, (generation, verdict) in enumerate(
            zip(item.responses, item.verdicts, strict=True)
        ):
            rows.append(
                {
                    "context": context,
                    "split": split,
                    "prompt_id": item.prompt.id,
                    "kind": item.prompt.kind,
                    "category": item.prompt.category,
                    "sample": index,
                    "prompt": item.prompt.text,
                    "response": generation.text,
                    "finish_reason": generation.finish_reason,
                    **_parts(item.split(index)),
                    **verdict.to_dict(),
                }
            )
    return rows


def _parts(split: ReasoningSplit) -> dict[str, Any]:
    """A response's reasoning and answer for results.jsonl (answer None: it never came)."""
    return {
        "reasoning": split.reasoning if split.has_reasoning else None,
        "answer": None if split.unfinished else split.answer,
        "reasoning_finished": split.closed,
    }


def write_run_files(result: RunResult, config: RunConfig) -> None:
    """results.jsonl, leaderboard.csv, best_context.yaml, run.json and report.html."""
    from flipsearch.report import render_report

    out = result.out
    rows = _judged_rows(result.student_search.harmful, None, "search")
    rows += _judged_rows(result.student_holdout.harmful, None, "holdout")
    rows += _judged_rows(result.student_search.benign, None, "benign")
    rows += _judged_rows(result.student_holdout.benign, None, "benign_holdout")
    if result.student_final is not None:
        rows += _judged_rows(result.student_final.harmful, None, "final")
        rows += _judged_rows(result.student_final.benign, None, "benign_final")
    finals = [result.final] if result.final is not None else []
    for score in [*result.search, *result.holdout, *finals]:
        rows += _judged_rows([o.teacher for o in score.harmful], score.context.id, score.split)
        benign_split = "benign" if score.split == "search" else f"benign_{score.split}"
        rows += _judged_rows(score.benign, score.context.id, benign_split)
    write_atomic(
        out / "results.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    write_atomic(out / "leaderboard.csv", result.leaderboard.to_csv(index=False))
    if result.winner is not None:
        best = result.winner.context.to_dict()
        held = next((s for s in result.holdout if s.context.id == best["id"]), None)
        best["measured"] = {
            "search_flip_rate": str(result.winner.flip_rate),
            "holdout_flip_rate": str(held.flip_rate) if held else None,
            "benign_refusal": str(result.winner.benign_refusal),
            "final_flip_rate": str(result.final.flip_rate) if result.final else None,
            "final_benign_refusal": str(result.final.benign_refusal) if result.final else None,
            "model": config.model,
            "judge": config.judges.judge,
        }
        write_atomic(
            out / "best_context.yaml", yaml.safe_dump(best, sort_keys=False, allow_unicode=True)
        )
    summary = {
        "config": config.to_dict(),
        **result.info,
        "student_unsafe_rate_search": result.student_search.unsafe_rate.to_dict(),
        "student_unsafe_rate_holdout": result.student_holdout.unsafe_rate.to_dict(),
        "student_benign_refusal": result.student_search.benign_refusal.to_dict(),
    }
    write_atomic(out / "run.json", json.dumps(summary, indent=2, default=str))
    render_report(out)


def _version() -> str:
    return _package_version("flipsearch")


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
