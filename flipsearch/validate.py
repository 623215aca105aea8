"""``flipsearch validate RUN_DIR``: does a higher teacher flip rate make a better OPSA teacher?

From a finished run: choose contexts (the winner, the next of the leaderboard, some spread
between them and a low-flip control, or the user's), re-measure each one's flip rate on the
run's whole search split, train each with the bundled loop under identical data, budget and
seeds (with ``offpolicy`` also the off-policy baseline), and evaluate every trained student and
the untrained one on prompts no choice has seen, with the run's judges.

Data. Training: the run's search and selection splits (harmful and benign). Evaluation: the
run's final split plus every prompt of its sets that its ``--limit`` left out (neither was ever
used to choose anything), a seeded, category-stratified ``eval_limit`` of each kind, and the
reasoning prompts.

Layout under ``RUN_DIR/validate/``: ``validate_config.json`` (a resumed validate must use the
same settings), ``contexts.json`` (the chosen contexts, their flip rates and per-prompt flips),
``untrained/evaluation.json``, one directory per training ``<context>/<mode>-seed<k>/``
(``train_config.json``, ``metrics.jsonl``, ``checkpoint/`` while it runs, ``done.json`` when
evaluated), and the answer: ``validation.json`` and ``validation.csv``. A killed validate
keeps finished trainings and restarts the interrupted one from its checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from flipsearch.config import RunConfig, TrainConfig, ValidateConfig
from flipsearch.contexts import Context, context_from_arg
from flipsearch.errors import FlipsearchError
from flipsearch.io import read_json, write_atomic
from flipsearch.prompts import Prompt, stratified_subset

MODES = ("onpolicy", "offpolicy")
EVALUATION_SPLIT = (
    "the run's final split and the prompts its --limit left out (no choice saw either)"
)


@dataclass
class Chosen:
    """A context to train, why it was chosen, and its flip rate on the whole search split."""

    context: Context
    role: str  # winner | runner-up | between | control | named
    flip_rate: dict[str, float] = field(default_factory=dict)  # Rate.to_dict()
    flips: dict[str, float] = field(default_factory=dict)  # per student-unsafe prompt


@dataclass
class Job:
    """One training: a context, a mode and a seed, in its own directory."""

    context: str
    mode: str
    seed: int
    out: Path
    config: TrainConfig

    @property
    def label(self) -> str:
        return f"{self.context} · {self.mode} · seed {self.seed}"


@dataclass
class ValidationData:
    train_harmful: list[Prompt]
    train_benign: list[Prompt]
    evaluation: dict[str, list[Prompt]]


# ---------------------------------------------------------------------------------------------
# The run: its config, its contexts, its prompts


def read_run(run_dir: Path) -> RunConfig:
    """The finished run's config (a run still going, or never run, is refused)."""
    if not (run_dir / "config.json").is_file():
        raise FlipsearchError(f"{run_dir}: not a run directory (no config.json)")
    if not (run_dir / "run.json").is_file() or not (run_dir / "leaderboard.csv").is_file():
        raise FlipsearchError(
            f"{run_dir}: the run has not finished (no run.json or leaderboard.csv); "
            "re-run `flipsearch run` with the same --out to finish it first"
        )
    return RunConfig.from_dict(read_json(run_dir / "config.json"))


def choose_contexts(run_dir: Path, config: ValidateConfig) -> list[Chosen]:
    """The contexts to train: ``config.contexts`` when given (leaderboard ids, YAML files or
    texts), else the winner, the next ``runners_up`` of the leaderboard, ``between`` contexts
    whose flip rates are evenly spread below them, and the lowest-flip control."""
    import pandas as pd

    board = pd.read_csv(run_dir / "leaderboard.csv")
    by_id = {str(r["context"]): r for r in board.to_dict(orient="records")}

    def of(row: Any) -> Context:
        return Context.from_dict(
            {
                "id": str(row["context"]),
                "text": str(row["text"]),
                "placement": str(row["placement"]),
                "family": str(row.get("family") or ""),
            },
            f"{run_dir / 'leaderboard.csv'}: row {row['context']!r}",
        )

    if config.contexts:
        named = [of(by_id[c]) if c in by_id else context_from_arg(c) for c in config.contexts]
        ids = [c.id for c in named]
        if len(set(ids)) != len(ids):
            raise FlipsearchError(f"--contexts names a context twice: {ids}")
        return [Chosen(c, "named") for c in named]
    winner = read_json(run_dir / "run.json").get("winner")
    rows = board.sort_values("rank").to_dict(orient="records")
    if winner is None:
        raise FlipsearchError(
            f"{run_dir}: the run has no winner (no context was within its benign-refusal "
            "limit); name the contexts to train with --contexts"
        )
    chosen = [(by_id[winner], "winner")]
    rest = [r for r in rows if str(r["context"]) != winner]
    chosen += [(r, "runner-up") for r in rest[: config.runners_up]]
    rest = rest[config.runners_up :]
    measured = [r for r in rest if pd.notna(r["flip_rate"])]
    control = None
    if config.control and measured:
        # Lowest flip rate; among equals the one measured on the most prompts.
        control = min(measured, key=lambda r: (r["flip_rate"], -r["flip_rate_n"], r["rank"]))
        measured = [r for r in measured if r is not control]
    top = min(float(r["flip_rate"]) for r, _ in chosen if pd.notna(r["flip_rate"]))
    bottom = float(control["flip_rate"]) if control is not None else 0.0
    for k in range(1, config.between + 1):
        if not measured:
            break
        target = bottom + (top - bottom) * k / (config.between + 1)
        pick = min(measured, key=lambda r: (abs(float(r["flip_rate"]) - target), r["rank"]))
        measured = [r for r in measured if r is not pick]
        chosen.append((pick, "between"))
    if control is not None:
        chosen.append((control, "control"))
    return [Chosen(of(row), role) for row, role in chosen]


def validation_data(run: RunConfig, seed: int, eval_limit: int) -> ValidationData:
    """Training prompts (the run's search and selection splits) and evaluation prompts (its
    final split and what its ``--limit`` left out)."""
    from flipsearch.run import run_splits
    from flipsearch.session import Session

    used = Session(prompts=run.prompts, limit=run.limit, seed=run.seed)
    every = Session(prompts=run.prompts, limit=None, seed=run.seed)
    splits = run_splits(used, run)
    taken = {p.id for p in used.prompts}

    def unseen(final: list[Prompt], kind: str) -> list[Prompt]:
        left = [p for p in every.prompts if p.kind == kind and p.id not in taken]
        return stratified_subset([*final, *left], eval_limit, seed)

    evaluation = {
        "harmful": unseen(splits.final, "harmful"),
        "benign": unseen(splits.benign_final, "benign"),
        "reasoning": stratified_subset(every.reasoning, eval_limit, seed),
    }
    if not evaluation["harmful"]:
        raise FlipsearchError(
            "no harmful prompt is left that the run never used (its final split is empty and "
            "its --limit left none out): re-run with --final-fraction above 0"
        )
    return ValidationData(
        [*splits.search, *splits.holdout],
        [*splits.benign, *splits.benign_holdout],
        evaluation,
    )


def measure_flip_rates(run: RunConfig, chosen: list[Chosen], console: Any) -> dict[str, float]:
    """Each context's flip rate on the run's whole search split, with the run's backend,
    judges and cache (a context the run measured completely costs no generation). Returns
    the student's unsafe pool: prompt id -> its unsafe share (the flip rates' denominator)."""
    from flipsearch.progress import make_progress
    from flipsearch.run import run_splits
    from flipsearch.session import Session

    session = Session.from_config(run, console=console)
    splits = run_splits(session, run)
    pool: dict[str, float] = {}
    with session, make_progress(console) as progress:
        evaluator = session.evaluator(progress)
        task = progress.add_task("flip rates on the search split", total=len(chosen))
        for item in chosen:
            score = evaluator.score(item.context, splits.search, [], "search")
            item.flip_rate = score.flip_rate.to_dict()
            item.flips = score.flip_outcomes()
            pool = {
                o.student.prompt.id: float(o.student.unsafe_share)
                for o in score.harmful
                if o.student.unsafe_share
            }
            progress.advance(task)
    return pool


# ---------------------------------------------------------------------------------------------
# The trainings


def _dirname(context_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", context_id) or "context"


def plan(run: RunConfig, config: ValidateConfig, chosen: list[Chosen], root: Path) -> list[Job]:
    """Every (context, mode, seed) training, each with its own directory and settings."""
    base = TrainConfig.after_run(run)
    baseline = len(chosen) if not config.offpolicy_limit else config.offpolicy_limit
    jobs = []
    for position, item in enumerate(chosen):
        modes = MODES if config.offpolicy and position < baseline else MODES[:1]
        folder = root / _dirname(item.context.id)
        folder.mkdir(parents=True, exist_ok=True)
        context_file = folder / "context.yaml"
        if not context_file.is_file():
            import yaml

            write_atomic(context_file, yaml.safe_dump(item.context.to_dict(), sort_keys=False))
        for mode in modes:
            for seed in range(config.train_seeds):
                out = folder / f"{mode}-seed{seed}"
                settings = replace(
                    base,
                    context=str(context_file),
                    out=str(out),
                    mode=mode,
                    seed=seed,
                    steps=config.steps,
                    lr=config.lr,
                    batch_size=config.batch_size,
                    eval_limit=config.eval_limit,
                    checkpoint_every=max(1, config.steps // 2),
                )
                jobs.append(Job(item.context.id, mode, seed, out, settings))
    return jobs


def evaluate_untrained(
    job_config: TrainConfig, data: ValidationData, out: Path, console: Any
) -> dict[str, Any]:
    """The untrained student on the evaluation prompts, measured once and kept."""
    from flipsearch.opsa import Trainer
    from flipsearch.progress import status
    from flipsearch.train_eval import evaluate_student

    path = out / "evaluation.json"
    if path.is_file():
        return dict(read_json(path))
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(replace(job_config, out=str(out)), harmful=data.train_harmful)
    with status(console, "evaluating the untrained student"):
        result = evaluate_student(
            trainer.loaded,
            trainer.teacher,
            data.evaluation,
            job_config.max_new_tokens,
            trainer.session,
        )
    write_atomic(path, json.dumps(result, indent=2))
    return result


def train_job(
    job: Job,
    data: ValidationData,
    keep_weights: bool = False,
    on_step: Callable[[Job, int], None] | None = None,
) -> dict[str, Any]:
    """Train one job (resuming its checkpoint) and evaluate it; ``done.json`` is its record."""
    from flipsearch.opsa import Trainer, bind_training, run_steps, truncate_metrics
    from flipsearch.train_eval import evaluate_student

    done = job.out / "done.json"
    if done.is_file():
        return dict(read_json(done))
    started = time.time()
    job.out.mkdir(parents=True, exist_ok=True)
    settings_file = job.out / "train_config.json"
    bind_training(settings_file, asdict(job.config), resume=settings_file.is_file())
    trainer = Trainer(job.config, harmful=data.train_harmful, benign=data.train_benign)
    resumed_from = trainer.step if trainer.load_checkpoint() else 0
    truncate_metrics(job.out / "metrics.jsonl", trainer.step)
    run_steps(trainer, (lambda _: on_step(job, trainer.step)) if on_step else None)
    after = evaluate_student(
        trainer.loaded,
        trainer.teacher,
        data.evaluation,
        job.config.max_new_tokens,
        trainer.session,
    )
    if keep_weights:
        trainer.model.save_pretrained(job.out / "final")
        trainer.tokenizer.save_pretrained(job.out / "final")
    record = {
        "context": job.context,
        "mode": job.mode,
        "seed": job.seed,
        "steps": trainer.step,
        "resumed_from_step": resumed_from or None,
        "seconds": round(time.time() - started, 1),
        "after": after,
    }
    write_atomic(done, json.dumps(record, indent=2))
    shutil.rmtree(job.out / "checkpoint", ignore_errors=True)  # done.json holds what counts
    return record


def _device_worker(device: str, jobs: list[Job], data: ValidationData, keep: bool) -> None:
    """A child process's share of the trainings, one after another on its device."""
    import torch

    if device == "cpu":
        torch.set_num_threads(1)
    for job in jobs:
        train_job(replace(job, config=replace(job.config, device=device)), data, keep)


def run_jobs(
    jobs: list[Job], data: ValidationData, config: ValidateConfig, console: Any
) -> list[dict[str, Any]]:
    """Every training: one at a time here, or side by side, one per ``--devices`` entry, in
    child processes whose progress is read from their ``metrics.jsonl``."""
    from flipsearch.progress import make_progress

    pending = [j for j in jobs if not (j.out / "done.json").is_file()]
    with make_progress(console) as progress:
        overall = progress.add_task(
            "trainings", total=len(jobs), completed=len(jobs) - len(pending)
        )
        tasks: dict[str, Any] = {}

        def show(job: Job, step: int) -> None:
            """One line per training as it starts: context, mode, seed and step."""
            if job.label not in tasks:
                tasks[job.label] = progress.add_task(
                    f"training {job.label}", total=job.config.steps
                )
            progress.update(tasks[job.label], completed=step)

        if len(config.devices) <= 1:
            device = config.devices[0] if config.devices else None
            for job in pending:
                if device is not None:
                    job = replace(job, config=replace(job.config, device=device))
                show(job, 0)
                train_job(job, data, config.keep_weights, show)
                progress.advance(overall)
        else:
            _side_by_side(pending, data, config, show, lambda: progress.advance(overall))
    return [dict(read_json(j.out / "done.json")) for j in jobs]


def _side_by_side(
    pending: list[Job],
    data: ValidationData,
    config: ValidateConfig,
    show: Callable[[Job, int], None],
    finished_one: Callable[[], None],
) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, wait

    shares: dict[str, list[Job]] = {d: [] for d in config.devices}
    for i, job in enumerate(pending):
        shares[config.devices[i % len(config.devices)]].append(job)
    context = multiprocessing.get_context("spawn")
    counted: set[str] = set()
    with ProcessPoolExecutor(len(config.devices), mp_context=context) as pool:
        futures = [
            pool.submit(_device_worker, device, share, data, config.keep_weights)
            for device, share in shares.items()
            if share
        ]
        while True:
            finished, running = wait(futures, timeout=1.0)
            for job in pending:
                metrics = job.out / "metrics.jsonl"
                if metrics.is_file():
                    show(job, len(metrics.read_text().splitlines()))
                if (job.out / "done.json").is_file() and job.label not in counted:
                    counted.add(job.label)
                    finished_one()
            if not running:
                break
        for future in finished:
            future.result()  # a child's error is raised here, with its message


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class ValidationResult:
    """What ``validate`` measured (``validation.json``); ``to_pandas()`` is the per-training
    table, ``contexts()`` the per-context one."""

    out: Path
    summary: dict[str, Any]

    def to_pandas(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.summary["trainings"])

    def contexts(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.summary["contexts"])


def validate(
    run_dir: str | Path, config: ValidateConfig | None = None, console: Any = None, **settings: Any
) -> ValidationResult:
    """Train the chosen contexts of a finished run and measure whether the flip rate predicted
    what training did. ``settings`` are ``ValidateConfig`` fields by name."""
    from rich.console import Console

    from flipsearch.validation_summary import summarise

    run_dir = Path(run_dir)
    console = console or Console(stderr=True)
    config = replace(config, **settings) if config is not None else ValidateConfig(**settings)
    run = read_run(run_dir)
    root = run_dir / "validate"
    root.mkdir(exist_ok=True)
    _bind(root / "validate_config.json", config)
    chosen, pool = _chosen(run_dir, run, config, root, console)
    data = validation_data(run, run.seed, config.eval_limit)
    jobs = plan(run, config, chosen, root)
    untrained = evaluate_untrained(jobs[0].config, data, root / "untrained", console)
    records = run_jobs(jobs, data, config, console)
    summary = summarise(chosen, pool, untrained, records, config)
    summary["evaluation_split"] = EVALUATION_SPLIT
    summary["training"] = {
        **{
            k: v
            for k, v in asdict(jobs[0].config).items()
            if k not in ("out", "context", "seed", "prompts", "limit")
        },
        "prompt_counts": {"harmful": len(data.train_harmful), "benign": len(data.train_benign)},
        "split": "the run's search and selection splits",
    }
    write_atomic(root / "validation.json", json.dumps(summary, indent=2))
    _write_csv(root / "validation.csv", summary["trainings"])
    from flipsearch.report import render_report

    render_report(run_dir)
    return ValidationResult(root, summary)


def _bind(path: Path, config: ValidateConfig) -> None:
    """A resumed validate must train what the finished trainings trained. Where they run
    (``devices``), what is kept, the bootstrap and whether off-policy baselines are added may
    change: each training's own settings are bound in its directory."""
    free = ("devices", "keep_weights", "bootstrap", "offpolicy", "offpolicy_limit")
    settings = {k: v for k, v in asdict(config).items() if k not in free}
    if path.is_file():
        before = read_json(path)
        changed = [k for k, v in settings.items() if before.get(k, v) != v]
        if changed:
            raise FlipsearchError(
                f"{path.parent} holds a validation with other settings "
                f"({', '.join(f'{k}: {before[k]!r} then, {settings[k]!r} now' for k in changed)}); "
                "resume it with those, or delete the folder to start again"
            )
    write_atomic(path, json.dumps(settings, indent=2))


def _chosen(
    run_dir: Path, run: RunConfig, config: ValidateConfig, root: Path, console: Any
) -> tuple[list[Chosen], dict[str, float]]:
    """The contexts, their flip rates and the student's unsafe pool, measured once and kept
    in ``contexts.json``."""
    path = root / "contexts.json"
    if path.is_file():
        kept = read_json(path)
        chosen = [
            Chosen(
                Context.from_dict(c["context"], str(path)), c["role"], c["flip_rate"], c["flips"]
            )
            for c in kept["contexts"]
        ]
        return chosen, {str(k): float(v) for k, v in kept["pool"].items()}
    chosen = choose_contexts(run_dir, config)
    pool = measure_flip_rates(run, chosen, console)
    rows = [{**asdict(c), "context": c.context.to_dict()} for c in chosen]
    write_atomic(path, json.dumps({"contexts": rows, "pool": pool}, indent=2))
    return chosen, pool


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import pandas as pd

    write_atomic(path, pd.DataFrame(rows).to_csv(index=False))
