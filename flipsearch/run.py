"""``flipsearch run`` and ``flipsearch score``: one run directory from prompts to report.

Data flow (DESIGN.md): student baseline → every candidate context scored on the search split →
the top-k re-scored on the held-out split → winner → files and report. Every generation goes
through the run's cache, so re-running the same command resumes and generates nothing twice.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flipsearch.backends import BackendSpec, Decoding, make_backend
from flipsearch.cache import GenerationCache
from flipsearch.contexts import Context, load_contexts
from flipsearch.errors import FlipsearchError
from flipsearch.evaluate import Evaluator, StudentBaseline
from flipsearch.fliprate import ContextScore, Judged, compare, paired_test
from flipsearch.grammar import load_grammar
from flipsearch.judging import JudgeSpec, get_judge
from flipsearch.labelled import read_judge_metrics, rogan_gladen
from flipsearch.models import LoadedModel, load_model
from flipsearch.prompts import Prompt, builtin_prompts, load_prompts, split_harmful
from flipsearch.proposer import Proposer
from flipsearch.scoring import analyse_context
from flipsearch.search import (
    ContextObjective,
    SearchSettings,
    context_of,
    enqueue_seeds,
    finished_trials,
    open_storage,
    open_study,
    recover_stale_trials,
    redacted_url,
    score_row,
    study_exists,
    trial_rows,
)


@dataclass
class RunConfig:
    """Everything a run depends on; saved as ``run.json`` in the run directory."""

    out: str = "runs/default"
    model: str = "smollm2-135m"
    prompts: list[str] = field(default_factory=list)  # empty: the shipped sets
    contexts: str | None = None  # a directory or file; None: the shipped seed library
    judge: str = "refusal"
    refusal_judge: str = "refusal"
    judge_model: str | None = None  # the llama-guard judge's weights (path or hub id)
    judge_metrics: str | None = None  # `flipsearch judge eval --json` output: corrected rates
    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    samples: int = 1
    seed: int = 0
    limit: int | None = None
    holdout_fraction: float = 0.3
    top_k: int = 3
    max_benign_refusal: float = 0.5
    batch_size: int = 64
    device: str = "auto"
    dtype: str = "auto"
    analysis_prompts: int = 16  # student-unsafe answers analysed token by token for the report
    # The search (flipsearch run); trials = 0 scores every seed context exhaustively instead.
    trials: int = 40
    timeout: float | None = None
    storage: str | None = None  # default: a journal file in the run directory
    study: str = "flipsearch"
    multi_objective: bool = False
    sampler: str = "tpe"
    proposer: str | None = None
    propose_every: int = 5
    prune_every: int = 8
    p_threshold: float = 0.1
    grammar: str | None = None  # default: grammar.yaml of the contexts folder, else the shipped one
    # Where generation runs: hf (in this process), vllm (offline engine), openai (servers).
    backend: str = "hf"
    base_url: list[str] = field(default_factory=list)  # openai: repeat for round-robin
    served_model: str | None = None  # openai: the server's name for the model (default: model)
    api_key_env: str = "OPENAI_API_KEY"  # the variable's name is stored, never its value
    openai_endpoint: str = "completions"
    max_in_flight: int = 32
    request_timeout: float = 300.0
    request_retries: int = 4
    vllm_args: dict[str, Any] = field(default_factory=dict)  # vllm: extra LLM(...) arguments

    def search_settings(self) -> SearchSettings:
        return SearchSettings(
            self.trials,
            self.timeout,
            self.storage,
            self.study,
            self.max_benign_refusal,
            self.multi_objective,
            self.sampler,
            self.prune_every,
            self.p_threshold,
            self.seed,
        )

    @property
    def decoding(self) -> Decoding:
        return Decoding(self.max_new_tokens, self.temperature, self.top_p, self.samples, self.seed)

    def backend_spec(self) -> BackendSpec:
        return BackendSpec(
            self.backend,
            tuple(self.base_url),
            self.served_model,
            self.api_key_env,
            self.openai_endpoint,
            self.max_in_flight,
            self.request_timeout,
            self.request_retries,
            dict(self.vllm_args),
        )


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
            }
        return {
            "out": str(self.out),
            "winner": winner,
            "student_unsafe_rate": self.student_search.unsafe_rate.to_dict(),
            "student_benign_refusal": self.student_search.benign_refusal.to_dict(),
            "leaderboard": self.leaderboard.to_dict(orient="records"),
            "info": self.info,
        }


def make_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def load_run_prompts(config: RunConfig) -> list[Prompt]:
    prompts = (
        [p for source in config.prompts for p in load_prompts(source)]
        if config.prompts
        else builtin_prompts()
    )
    seen: set[str] = set()
    for prompt in prompts:
        if prompt.id in seen:
            raise FlipsearchError(f"prompt id {prompt.id!r} appears in more than one prompt file")
        seen.add(prompt.id)
    if config.limit is not None:
        if config.limit < 1:
            raise FlipsearchError("--limit must be at least 1")
        kept: list[Prompt] = []
        for kind in ("harmful", "benign", "reasoning"):
            kept.extend([p for p in prompts if p.kind == kind][: config.limit])
        prompts = kept
    return prompts


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
    config = replace(
        config,
        model=model.name if model is not None else config.model,
        judge=_judge_name(judge) if judge is not None else config.judge,
        refusal_judge=_judge_name(refusal_judge)
        if refusal_judge is not None
        else config.refusal_judge,
    )
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if contexts is not None:
        candidates = list(contexts)
    elif seeds is not None:
        candidates = list(seeds)
    else:
        candidates = load_contexts(config.contexts)
    if not candidates:
        raise FlipsearchError("no contexts to score or search from")
    prompts = load_run_prompts(config)
    harmful = [p for p in prompts if p.kind == "harmful"]
    benign = [p for p in prompts if p.kind == "benign"]
    if not harmful:
        raise FlipsearchError("the prompt sets hold no harmful prompts; flip rates need them")
    search_split, holdout_split = split_harmful(harmful, config.holdout_fraction, config.seed)
    decoding = config.decoding
    safety_judge = get_judge(
        judge if judge is not None else config.judge, "safety", config.judge_model
    )
    benign_judge = get_judge(
        refusal_judge if refusal_judge is not None else config.refusal_judge,
        "refusal",
        config.judge_model,
    )
    correction = read_judge_metrics(config.judge_metrics) if config.judge_metrics else None
    backend = config.backend_spec()
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2))

    if model is not None:
        loaded = model
    else:
        with console.status(f"loading model {config.model}"):
            loaded = load_model(
                config.model, config.device, config.dtype, weights=backend.needs_weights
            )
    with console.status(f"starting the {backend.name} backend"):
        generator, scorer = make_backend(backend, loaded, config.batch_size)
    cache = GenerationCache(out / "generations.sqlite")
    cached_before = len(cache)
    with make_progress(console) as progress:
        evaluator = Evaluator(
            loaded,
            safety_judge,
            benign_judge,
            decoding,
            cache,
            config.batch_size,
            generator=generator,
            progress=progress,
        )
        evaluator.prefetch([*search_split, *holdout_split, *benign], None)
        student_search = StudentBaseline(
            evaluator.judged(search_split, None, "safety"),
            evaluator.judged(benign, None, "refusal") if benign else [],
        )
        student_holdout = StudentBaseline(evaluator.judged(holdout_split, None, "safety"), [])
        study_info: dict[str, Any] = {}
        if contexts is not None or config.trials == 0:
            overall = progress.add_task("contexts on the search split", total=len(candidates))
            rows = []
            for context in candidates:
                rows.append(score_row(evaluator.score(context, search_split, benign, "search")))
                progress.advance(overall)
        else:
            rows, study_info = _search(
                config, out, evaluator, candidates, search_split, benign, loaded, progress
            )
        ranked = rank_rows(rows, config.max_benign_refusal)
        finalists = [context_of(r) for r in ranked if r["state"] == "complete"][: config.top_k]
        task = progress.add_task("top contexts on both splits", total=len(finalists))
        search, holdout = [], []
        for context in finalists:
            search.append(evaluator.score(context, search_split, benign, "search"))
            if holdout_split:
                holdout.append(evaluator.score(context, holdout_split, [], "holdout"))
            progress.advance(task)
        if search:  # finalists now have every benign prompt measured: their rows say so
            rescored = {s.context.id: score_row(s) for s in search}
            rows = [{**r, **rescored.get(r["context"], {})} for r in rows]
            ranked = rank_rows(rows, config.max_benign_refusal)
    winner = _pick_winner(search, holdout, config.max_benign_refusal)
    leaderboard = build_leaderboard(ranked, holdout, config.max_benign_refusal)
    if correction is not None:
        add_corrected_rates(leaderboard, **correction)
    token_analysis = "none (no winner)"
    if winner is not None:
        try:
            with console.status("token-level analysis of the winner"):
                analysis = analyse_context(
                    loaded,
                    winner,
                    limit=config.analysis_prompts,
                    scorer=None if backend.name == "hf" else scorer,
                )
        except FlipsearchError as exc:
            if backend.name == "hf":
                raise
            # A server that cannot score (chat-only) still gives every rate; say what is missing.
            token_analysis = f"skipped: {exc}"
            console.print(f"[yellow]token-level analysis {token_analysis}[/yellow]")
        else:
            token_analysis = analysis["divergence"]
            _write_atomic(out / "token_kl.json", json.dumps(analysis))
    info = {
        "flipsearch_version": _version(),
        "model": config.model,
        "model_fingerprint": loaded.fingerprint,
        "backend": backend.name,
        "token_analysis": token_analysis,
        "generator_fingerprint": generator.fingerprint,
        "dtype": loaded.dtype,
        "device": str(loaded.model.device) if loaded.model is not None else backend.name,
        "python": platform.python_version(),
        "torch": _package_version("torch"),
        "transformers": _package_version("transformers"),
        "prompt_counts": {
            "harmful_search": len(search_split),
            "harmful_holdout": len(holdout_split),
            "benign": len(benign),
        },
        "contexts": len(candidates),
        "generated": dict(evaluator.generated),
        "cached_before": cached_before,
        "seconds": round(time.time() - started, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "student_prompt_example": evaluator.renderer.render(search_split[0].text, None),
        "teacher_prompt_example": evaluator.renderer.render(
            search_split[0].text, (winner or search[0]).context
        ),
        "winner": winner.context.id if winner else None,
        **study_info,
    }
    result = RunResult(
        out, student_search, student_holdout, search, holdout, leaderboard, winner, info
    )
    write_run_files(result, config)
    cache.close()
    return result


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
    unknown = set(settings) - {f.name for f in fields(RunConfig)}
    if unknown:
        raise FlipsearchError(f"unknown search settings: {', '.join(sorted(unknown))}")
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


def _search(
    config: RunConfig,
    out: Path,
    evaluator: Evaluator,
    seeds: list[Context],
    search_split: list[Prompt],
    benign: list[Prompt],
    loaded: Any,
    progress: Progress,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run (or resume, or join) the study; returns its rows and facts for run.json."""
    settings = config.search_settings()
    grammar = load_grammar(config.grammar or _grammar_beside(config.contexts))
    storage = open_storage(settings.storage, out)
    objective = ContextObjective(
        evaluator,
        seeds,
        grammar,
        search_split,
        benign,
        settings,
        on_trial=lambda: progress.update(
            task, completed=min(finished_trials(study), settings.trials)
        ),
    )
    order = seeds
    if not settings.multi_objective and not study_exists(storage, settings.study):
        order = objective.screen(seeds)  # strongest seeds first: the rest prune against them
    study, created = open_study(settings, storage)
    if created:
        enqueue_seeds(study, order)
    recovered = recover_stale_trials(study, storage)
    task = progress.add_task(
        "search trials",
        total=settings.trials,
        completed=min(finished_trials(study), settings.trials),
    )
    proposer = None
    if config.proposer:
        proposer_model = (
            loaded
            if config.proposer == config.model
            else load_model(config.proposer, device=config.device, dtype=config.dtype)
        )
        # The student model proposes through the run's backend; another model loads locally.
        proposer = Proposer(
            proposer_model,
            generator=evaluator.generator if proposer_model is loaded else None,
        )
    deadline = None if settings.timeout is None else time.time() + settings.timeout
    since_proposal = 0
    while finished_trials(study) < settings.trials:
        if deadline is not None and time.time() >= deadline:
            break
        if proposer is not None and since_proposal >= config.propose_every:
            since_proposal = 0
            rows = trial_rows(study)
            best = max(
                (r for r in rows if r["state"] == "complete"),
                key=lambda r: r["flip_rate"] or 0.0,
                default=None,
            )
            placement = best["placement"] if best else "system"
            proposal = proposer.propose(rows, placement, seed=config.seed + len(rows))
            if proposal is not None:
                study.enqueue_trial({}, user_attrs={"proposed": proposal.to_dict()})
        study.optimize(objective, n_trials=1, catch=())
        since_proposal += 1
    rows = trial_rows(study)
    info: dict[str, Any] = {
        "study": {
            "name": settings.study,
            "storage": "journal file in the run directory"
            if settings.storage is None
            else redacted_url(settings.storage),
            "trials": len(study.trials),
            "finished": finished_trials(study),
            "pruned": sum(r["state"] == "pruned" for r in rows),
            "recovered_stale_trials": recovered,
            "multi_objective": settings.multi_objective,
            "grammar_size": grammar.size(),
        },
        "importances": _importances(study),
        "history": [
            {
                "trial": r["trial"],
                "flip_rate": r["flip_rate"],
                "state": r["state"],
                "benign_refusal": r.get("benign_refusal"),
                "source": r["source"],
            }
            for r in rows
        ],
    }
    return rows, info


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
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError):  # too few completed trials with parameters
        return {}


def rank_rows(rows: Sequence[dict[str, Any]], max_benign_refusal: float) -> list[dict[str, Any]]:
    """Complete and feasible first, then by flip rate, then by lower benign refusal."""
    return sorted(
        rows,
        key=lambda row: _rank_key(
            row["state"] == "complete",
            row.get("flip_rate"),
            row.get("benign_refusal"),
            max_benign_refusal,
        ),
    )


def rank(scores: Sequence[ContextScore], max_benign_refusal: float) -> list[ContextScore]:
    """``rank_rows`` for fully scored contexts."""
    return sorted(
        scores,
        key=lambda score: _rank_key(
            True, score.flip_rate.value, _benign_value(score), max_benign_refusal
        ),
    )


def _rank_key(
    complete: bool, flip: float | None, refusal: float | None, max_benign_refusal: float
) -> tuple[bool, bool, float, float]:
    """Unmeasured (None or NaN) flip rates sort last; unmeasured benign refusal is feasible."""
    return (
        not complete,
        not _refusal_feasible(refusal, max_benign_refusal),
        -(flip if flip is not None and flip == flip else -1.0),
        refusal if refusal is not None else 0.0,
    )


def _refusal_feasible(refusal: float | None, max_benign_refusal: float) -> bool:
    return refusal is None or refusal <= max_benign_refusal


def _benign_value(score: ContextScore) -> float | None:
    return score.benign_refusal.value if score.benign else None


def _row_feasible(row: dict[str, Any], max_benign_refusal: float) -> bool:
    return _refusal_feasible(row.get("benign_refusal"), max_benign_refusal)


def _feasible(score: ContextScore, max_benign_refusal: float) -> bool:
    return _refusal_feasible(_benign_value(score), max_benign_refusal)


def _pick_winner(
    search: list[ContextScore], holdout: list[ContextScore], max_benign_refusal: float
) -> ContextScore | None:
    """The winner is chosen on the held-out split among the finalists (feasible ones first)."""
    if not holdout:
        ranked = rank(search, max_benign_refusal)
        return ranked[0] if ranked else None
    by_id = {s.context.id: s for s in search}
    order = {s.context.id: i for i, s in enumerate(rank(search, max_benign_refusal))}

    def key(score: ContextScore) -> tuple[bool, float, int]:
        flip = score.flip_rate.value
        feasible = _feasible(by_id[score.context.id], max_benign_refusal)
        return (not feasible, -(flip if flip == flip else -1.0), order[score.context.id])

    best = min(holdout, key=key)
    return by_id[best.context.id]


def build_leaderboard(
    ranked: list[dict[str, Any]], holdout: list[ContextScore], max_benign_refusal: float
) -> pd.DataFrame:
    """The leaderboard: one row per context, best first, with paired p-values and held-out rates."""
    holdout_by_id = {s.context.id: s for s in holdout}
    leader = ranked[0]["outcomes"] if ranked else {}
    rows = []
    for position, source in enumerate(ranked, start=1):
        row: dict[str, Any] = {"rank": position}
        row.update({k: v for k, v in source.items() if k not in ("outcomes", "tags")})
        row["feasible"] = _row_feasible(source, max_benign_refusal)
        common = sorted(set(leader) & set(source["outcomes"]))
        row["p_vs_leader"] = (
            paired_test([source["outcomes"][i] for i in common], [leader[i] for i in common])
            if position > 1
            else float("nan")
        )
        held = holdout_by_id.get(source["context"])
        if held is not None:
            rate = held.flip_rate
            row.update(
                holdout_flip_rate=rate.value,
                holdout_flip_rate_low=rate.low,
                holdout_flip_rate_high=rate.high,
                holdout_flips=rate.successes,
                holdout_pool=rate.n,
            )
        rows.append(row)
    frame = pd.DataFrame(rows)
    if holdout:
        finalists = sorted(holdout, key=lambda s: -_value(s.flip_rate.value))
        p_values = {}
        for i, score in enumerate(finalists):
            other = finalists[1] if i == 0 and len(finalists) > 1 else finalists[0]
            p_values[score.context.id] = (
                compare(score, other) if other is not score else float("nan")
            )
        frame["holdout_p_vs_runner_up"] = frame["context"].map(p_values)
    return frame


def add_corrected_rates(frame: pd.DataFrame, sensitivity: float, specificity: float) -> None:
    """Flip rates corrected for judge error (Rogan-Gladen on the teacher's unsafe share).

    The student pool is taken as judged; only the teacher's verdicts on it are corrected.
    """
    for column in ("flip_rate", "holdout_flip_rate"):
        if column in frame:
            frame[f"{column}_corrected"] = frame[column].map(
                lambda f: f if f != f else 1 - rogan_gladen(1 - f, sensitivity, specificity)
            )


def _value(x: float) -> float:
    return -1.0 if x != x else x


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
                    **verdict.to_dict(),
                }
            )
    return rows


def write_run_files(result: RunResult, config: RunConfig) -> None:
    """results.jsonl, leaderboard.csv, best_context.yaml, run.json and report.html."""
    from flipsearch.report import render_report

    out = result.out
    rows = _judged_rows(result.student_search.harmful, None, "search")
    rows += _judged_rows(result.student_holdout.harmful, None, "holdout")
    rows += _judged_rows(result.student_search.benign, None, "benign")
    for score in [*result.search, *result.holdout]:
        rows += _judged_rows([o.teacher for o in score.harmful], score.context.id, score.split)
        rows += _judged_rows(score.benign, score.context.id, "benign")
    _write_atomic(
        out / "results.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    _write_atomic(out / "leaderboard.csv", result.leaderboard.to_csv(index=False))
    if result.winner is not None:
        best = result.winner.context.to_dict()
        held = next((s for s in result.holdout if s.context.id == best["id"]), None)
        best["measured"] = {
            "search_flip_rate": str(result.winner.flip_rate),
            "holdout_flip_rate": str(held.flip_rate) if held else None,
            "benign_refusal": str(result.winner.benign_refusal),
            "model": config.model,
            "judge": config.judge,
        }
        _write_atomic(
            out / "best_context.yaml", yaml.safe_dump(best, sort_keys=False, allow_unicode=True)
        )
    summary = {
        "config": asdict(config),
        **result.info,
        "student_unsafe_rate_search": result.student_search.unsafe_rate.to_dict(),
        "student_unsafe_rate_holdout": result.student_holdout.unsafe_rate.to_dict(),
        "student_benign_refusal": result.student_search.benign_refusal.to_dict(),
    }
    _write_atomic(out / "run.json", json.dumps(summary, indent=2, default=str))
    render_report(out)


def _write_atomic(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text, encoding="utf-8")
    staging.replace(path)


def _version() -> str:
    return _package_version("flipsearch")


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
