"""The ``flipsearch`` command line (typer). User mistakes exit with code 2 and one line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flipsearch.contexts import PLACEMENTS, context_from_arg, load_contexts
from flipsearch.errors import FlipsearchError
from flipsearch.fliprate import Rate
from flipsearch.report import render_report
from flipsearch.run import RunConfig, RunResult
from flipsearch.run import run as run_pipeline

app = typer.Typer(
    help="Find, measure and train with the privileged safety context for OPSA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
contexts_app = typer.Typer(help="Inspect the context library.", no_args_is_help=True)
app.add_typer(contexts_app, name="contexts")
judge_app = typer.Typer(help="Train, measure and run judges.", no_args_is_help=True)
app.add_typer(judge_app, name="judge")
Label = Annotated[str, typer.Option(help="Which label: unsafe (safety judge) or refusal.")]
out_console = Console()
err_console = Console(stderr=True)

Out = Annotated[Path, typer.Option(help="Run directory; re-running with the same one resumes.")]
Model = Annotated[str, typer.Option(help="Model alias (smollm2-135m), local directory or hub id.")]
Prompts = Annotated[
    list[str] | None,
    typer.Option(
        "--prompts",
        help="Prompt file (JSONL/CSV/Parquet), builtin:NAME or hf:NAME; repeatable. "
        "Default: the shipped harmful, benign and reasoning sets.",
    ),
]
ContextsDir = Annotated[
    str | None,
    typer.Option(
        "--contexts", help="Directory (or file) of seed contexts. Default: the shipped library."
    ),
]
Judge = Annotated[
    str,
    typer.Option(
        help="Safety judge for answers to harmful prompts: refusal, llama-guard, classifier, "
        "classifier:DIR, ensemble:MODE:A+B."
    ),
]
RefusalJudge = Annotated[
    str,
    typer.Option(
        help="Judge deciding whether a benign answer refuses: refusal, classifier, classifier:DIR."
    ),
]
JudgeModel = Annotated[
    str | None, typer.Option(help="Weights of the llama-guard judge (a local directory or hub id).")
]
JudgeMetrics = Annotated[
    str | None,
    typer.Option(
        help="JSON from `flipsearch judge eval --json`: adds flip rates corrected for judge error."
    ),
]
Samples = Annotated[int, typer.Option(min=1, help="Samples per prompt (needs --temperature > 0).")]
Temperature = Annotated[float, typer.Option(min=0.0, help="0 = greedy (the paper's choice).")]
TopP = Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")]
MaxNew = Annotated[int, typer.Option(min=1, help="Tokens generated per response.")]
Limit = Annotated[int | None, typer.Option(min=1, help="Use the first N prompts of each kind.")]
Seed = Annotated[int, typer.Option(help="Seed of the split and of sampling.")]
Holdout = Annotated[
    float, typer.Option(min=0.0, max=0.95, help="Share of harmful prompts held out.")
]
TopK = Annotated[int, typer.Option(min=1, help="Contexts re-scored on the held-out split.")]
MaxBenign = Annotated[
    float,
    typer.Option(min=0.0, max=1.0, help="Contexts whose benign refusal exceeds this cannot win."),
]
BatchSize = Annotated[int, typer.Option(min=1, help="Sequences generated per batch.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 where native), bf16, fp16 or fp32.")]
Backend = Annotated[
    str,
    typer.Option(
        help="Where generation runs: hf (transformers here), vllm (vLLM's engine here) or "
        "openai (OpenAI-compatible servers at --base-url).",
        rich_help_panel="Backend",
    ),
]
BaseUrl = Annotated[
    list[str] | None,
    typer.Option(
        "--base-url",
        help="An OpenAI-compatible server, e.g. http://HOST:8000/v1; repeat for round-robin.",
        rich_help_panel="Backend",
    ),
]
ServedModel = Annotated[
    str | None,
    typer.Option(
        help="The server's name for the model (default: --model). --model still names the "
        "local tokenizer and chat template.",
        rich_help_panel="Backend",
    ),
]
ApiKeyEnv = Annotated[
    str,
    typer.Option(
        help="Environment variable holding the API key (read, never stored).",
        rich_help_panel="Backend",
    ),
]
OpenAIEndpoint = Annotated[
    str,
    typer.Option(
        help="completions (flipsearch renders the chat template) or chat (the server does).",
        rich_help_panel="Backend",
    ),
]
MaxInFlight = Annotated[
    int, typer.Option(min=1, help="Requests in flight at once.", rich_help_panel="Backend")
]
RequestTimeout = Annotated[
    float, typer.Option(min=1, help="Seconds per request.", rich_help_panel="Backend")
]
VLLMArgs = Annotated[
    list[str] | None,
    typer.Option(
        "--vllm-arg",
        help="An argument of vLLM's LLM(...) as KEY=VALUE, e.g. tensor_parallel_size=2 or "
        "gpu_memory_utilization=0.8; repeatable.",
        rich_help_panel="Backend",
    ),
]
RequestRetries = Annotated[
    int,
    typer.Option(
        min=0, help="Retries on 429/5xx/timeouts, with backoff.", rich_help_panel="Backend"
    ),
]


def _config(**options: Any) -> RunConfig:
    options["out"] = str(options["out"])
    options["prompts"] = list(options.get("prompts") or [])
    options["base_url"] = list(options.get("base_url") or [])
    options["vllm_args"] = _key_values(options.pop("vllm_arg", None) or [], "--vllm-arg")
    return RunConfig(**options)


def _key_values(items: list[str], option: str) -> dict[str, Any]:
    """KEY=VALUE pairs; values are read as YAML scalars (2 -> int, 0.8 -> float, true -> bool)."""
    import yaml

    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FlipsearchError(f"{option} {item!r}: expected KEY=VALUE")
        try:
            parsed[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise FlipsearchError(f"{option} {item!r}: cannot read the value ({exc})") from exc
    return parsed


@app.command()
def run(
    out: Out = Path("runs/default"),
    model: Model = "smollm2-135m",
    prompts: Prompts = None,
    contexts: ContextsDir = None,
    judge: Judge = "refusal",
    refusal_judge: RefusalJudge = "refusal",
    judge_model: JudgeModel = None,
    judge_metrics: JudgeMetrics = None,
    samples: Samples = 1,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    max_new_tokens: MaxNew = 48,
    limit: Limit = None,
    seed: Seed = 0,
    holdout_fraction: Holdout = 0.3,
    top_k: TopK = 3,
    max_benign_refusal: MaxBenign = 0.5,
    batch_size: BatchSize = 64,
    device: Device = "auto",
    dtype: Dtype = "auto",
    backend: Backend = "hf",
    base_url: BaseUrl = None,
    served_model: ServedModel = None,
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY",
    openai_endpoint: OpenAIEndpoint = "completions",
    max_in_flight: MaxInFlight = 32,
    request_timeout: RequestTimeout = 300.0,
    request_retries: RequestRetries = 4,
    vllm_arg: VLLMArgs = None,
    trials: Annotated[
        int,
        typer.Option(
            min=0,
            help="Trials in the study (seeds first, then grammar compositions); shared by "
            "all workers of a study. 0 scores every seed context without a study.",
        ),
    ] = 40,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="Stop starting new trials after this many seconds.")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Optuna storage URL (postgresql://..., sqlite:///..., or a .journal file) shared "
            "by several workers. Default: a journal file in the run directory."
        ),
    ] = None,
    study: Annotated[str, typer.Option(help="Study name inside the storage.")] = "flipsearch",
    multi_objective: Annotated[
        bool,
        typer.Option(
            help="Flip rate vs benign refusal as two objectives (Pareto front; no pruning)."
        ),
    ] = False,
    sampler: Annotated[str, typer.Option(help="tpe or nsga2 (nsga2 for multi-objective).")] = "tpe",
    proposer: Annotated[
        str | None,
        typer.Option(
            help="A chat model that rewrites the best contexts so far into new candidates."
        ),
    ] = None,
    prune_every: Annotated[
        int, typer.Option(min=1, help="Prompts scored between pruning checks.")
    ] = 8,
    grammar: Annotated[
        str | None,
        typer.Option(
            help="The grammar file to compose contexts from. Default: contexts/grammar.yaml."
        ),
    ] = None,
    train: Annotated[
        bool,
        typer.Option(
            "--train", help="Then train the student with OPSA on the winner (into OUT/train)."
        ),
    ] = False,
    train_steps: Annotated[int, typer.Option(min=1, help="Training steps with --train.")] = 20,
) -> None:
    """Search for the best privileged safety context on the student's unsafe answers.

    Student baseline; an Optuna study whose trials score the seed contexts, then contexts
    composed from the grammar, with paired pruning; the top-k re-scored on the held-out split.
    Writes leaderboard.csv, results.jsonl, best_context.yaml and report.html. Re-running the
    same command resumes; several workers can share one study through --storage.
    """
    options = dict(locals())
    do_train, steps = options.pop("train"), options.pop("train_steps")
    config = _config(**options)
    result = run_pipeline(config, console=err_console)
    _summarise(result)
    if do_train:
        if result.winner is None:
            raise FlipsearchError("no winning context to train with")
        from flipsearch.opsa import TrainConfig
        from flipsearch.opsa import train as train_student

        trained = train_student(
            TrainConfig(
                context=str(Path(config.out) / "best_context.yaml"),
                out=str(Path(config.out) / "train"),
                model=config.model,
                prompts=config.prompts,
                limit=config.limit,
                steps=steps,
                max_new_tokens=config.max_new_tokens,
                seed=config.seed,
            ),
            resume=True,
            console=err_console,
        )
        _print_before_after(trained.summary)
        out_console.print(f"report: {render_report(config.out).resolve()}")


@app.command()
def score(
    context: Annotated[
        list[str],
        typer.Option(
            "--context", help="A context YAML file or the context text itself; repeatable."
        ),
    ],
    placement: Annotated[
        str, typer.Option(help=f"Placement of contexts given as text: {', '.join(PLACEMENTS)}.")
    ] = "system",
    out: Out = Path("runs/score"),
    model: Model = "smollm2-135m",
    prompts: Prompts = None,
    judge: Judge = "refusal",
    refusal_judge: RefusalJudge = "refusal",
    judge_model: JudgeModel = None,
    judge_metrics: JudgeMetrics = None,
    samples: Samples = 1,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    max_new_tokens: MaxNew = 48,
    limit: Limit = None,
    seed: Seed = 0,
    holdout_fraction: Holdout = 0.3,
    top_k: TopK = 3,
    max_benign_refusal: MaxBenign = 0.5,
    batch_size: BatchSize = 64,
    device: Device = "auto",
    dtype: Dtype = "auto",
    backend: Backend = "hf",
    base_url: BaseUrl = None,
    served_model: ServedModel = None,
    api_key_env: ApiKeyEnv = "OPENAI_API_KEY",
    openai_endpoint: OpenAIEndpoint = "completions",
    max_in_flight: MaxInFlight = 32,
    request_timeout: RequestTimeout = 300.0,
    request_retries: RequestRetries = 4,
    vllm_arg: VLLMArgs = None,
) -> None:
    """Score the given contexts only; writes the same run files as ``run``."""
    candidates = [context_from_arg(value, placement) for value in context]
    ids = [c.id for c in candidates]
    if len(set(ids)) != len(ids):
        raise FlipsearchError("the same context was given twice")
    options = dict(locals())
    for name in ("context", "placement", "candidates", "ids"):
        options.pop(name)
    config = _config(**options, trials=0)
    _summarise(run_pipeline(config, contexts=candidates, console=err_console))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """Re-render report.html from a run directory's files (after editing reports/, say)."""
    out_console.print(f"report: {render_report(run_dir).resolve()}")


@app.command("train")
def train_command(
    context: Annotated[
        str,
        typer.Option(help="The safety context: a YAML file like best_context.yaml, or its text."),
    ],
    model: Model = "smollm2-135m",
    prompts: Prompts = None,
    out: Annotated[Path, typer.Option(help="Training directory (checkpoints, metrics).")] = Path(
        "runs/train"
    ),
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 20,
    limit: Limit = None,
    max_new_tokens: MaxNew = 48,
    seed: Seed = 0,
    mode: Annotated[
        str,
        typer.Option(help="onpolicy (OPSA) or offpolicy (fine-tune on the teacher's responses)."),
    ] = "onpolicy",
    divergence: Annotated[str, typer.Option(help="reverse, forward or mixed.")] = "reverse",
    alpha: Annotated[float, typer.Option(min=0, max=1, help="Teacher weight of mixed.")] = 0.5,
    support: Annotated[str, typer.Option(help="full, topk or sampled.")] = "full",
    top_k: Annotated[int, typer.Option(min=1, help="Tokens kept by --support topk.")] = 20,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per micro-batch.")] = 4,
    grad_accum: Annotated[int, typer.Option(min=1, help="Micro-batches per step.")] = 1,
    lr: Annotated[float, typer.Option(min=0, help="Peak learning rate (AdamW).")] = 1e-5,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Linear warm-up steps.")] = 2,
    max_grad_norm: Annotated[float, typer.Option(min=0, help="Gradient clipping.")] = 1.0,
    temperature: Annotated[float, typer.Option(min=0.01, help="Rollout temperature.")] = 1.0,
    top_p: TopP = 1.0,
    harmful_fraction: Annotated[
        float, typer.Option(min=0, max=1, help="Share of harmful prompts in a batch.")
    ] = 0.5,
    benign_context: Annotated[
        str | None,
        typer.Option(
            help="Context for benign prompts (default none: the original model anchors them)."
        ),
    ] = None,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Steps between checkpoints.")] = 10,
    eval_limit: Annotated[int, typer.Option(min=1, help="Prompts per evaluation set.")] = 32,
    dtype: Annotated[
        str, typer.Option(help="Autocast: auto (bf16 where native) or fp32.")
    ] = "auto",
    resume: Annotated[
        bool, typer.Option(help="Continue from the last checkpoint in --out.")
    ] = False,
) -> None:
    """Train the student with OPSA on a context, evaluating before and after."""
    options = dict(locals())
    options.pop("resume")
    from flipsearch.opsa import TrainConfig, train

    options["out"] = str(out)
    options["prompts"] = list(prompts or [])
    result = train(TrainConfig(**options), resume=resume, console=err_console)
    _print_before_after(result.summary)
    out_console.print(f"trained weights: {(out / 'final').resolve()}")


def _print_before_after(summary: dict[str, Any]) -> None:
    table = Table(title=f"before / after {summary['steps']} {summary['mode']} steps")
    for column in ("metric", "before", "after"):
        table.add_column(column)
    for key in ("unsafe_rate", "benign_refusal", "reasoning_accuracy"):
        before, after = summary["before"][key], summary["after"][key]
        table.add_row(
            key.replace("_", " "),
            str(Rate.of(before["successes"], before["n"])),
            str(Rate.of(after["successes"], after["n"])),
        )
    table.add_row(
        "benign KL from original",
        f"{summary['before']['benign_kl_from_original']:.4f}",
        f"{summary['after']['benign_kl_from_original']:.4f}",
    )
    out_console.print(table)


@app.command("export")
def export_command(
    context: Annotated[str, typer.Option(help="The context (best_context.yaml or its text).")],
    format: Annotated[
        str, typer.Option(help="trl-sdft: prompt + privileged_context rows.")
    ] = "trl-sdft",
    prompts: Prompts = None,
    limit: Limit = None,
    out: Annotated[Path, typer.Option(help="The dataset file (JSONL).")] = Path(
        "runs/trl-sdft.jsonl"
    ),
    force: Annotated[
        bool, typer.Option(help="Export a context measured at another placement anyway.")
    ] = False,
) -> None:
    """Write the prompts and the winning context as a dataset for TRL's self-distillation."""
    from flipsearch.export import export_trl_sdft

    if format != "trl-sdft":
        raise FlipsearchError(f"unknown export format {format!r}; available: trl-sdft")
    rows = export_trl_sdft(context, list(prompts or []), limit, out, force)
    out_console.print(f"{rows} rows: {out} (teacher placement user_suffix, as TRL renders it)")


@judge_app.command("train")
def judge_train(
    labelled: Annotated[
        Path | None,
        typer.Argument(
            help="Labelled JSONL/CSV (prompt, response, unsafe/refusal). Default: the shipped set."
        ),
    ] = None,
    label: Label = "unsafe",
    out: Annotated[Path, typer.Option(help="Directory to write the classifier to.")] = Path(
        "judges-trained/classifier"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the model.")] = 0,
) -> None:
    """Train the classifier judge (TF-IDF + calibrated logistic regression; saved with skops)."""
    from flipsearch.classifier import train_classifier
    from flipsearch.labelled import default_labelled_path, load_labelled

    source = labelled or default_labelled_path()
    rows = load_labelled(source, label)
    path = train_classifier(rows, label, out, source=str(source), seed=seed)
    out_console.print(
        f"trained a {label!r} classifier on {len(rows)} rows: use --judge classifier:{path}"
    )


@judge_app.command("eval")
def judge_eval(
    labelled: Annotated[
        Path | None, typer.Argument(help="Labelled JSONL/CSV. Default: the shipped set.")
    ] = None,
    judge: Annotated[str, typer.Option(help="The judge to measure (any judge name).")] = "refusal",
    label: Label = "unsafe",
    judge_model: JudgeModel = None,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Also write the metrics here (usable as --judge-metrics)."),
    ] = None,
) -> None:
    """Measure a judge against labels: precision, recall, F1, AUROC, Cohen's kappa, confusion."""
    import json

    from flipsearch.judging import get_judge
    from flipsearch.labelled import evaluate_judge, load_labelled

    rows = load_labelled(labelled, label)
    role = "safety" if label == "unsafe" else "refusal"
    metrics = evaluate_judge(get_judge(judge, role, judge_model), rows, label)
    table = Table(title=f"{judge} against the {label!r} labels of {len(rows)} rows")
    table.add_column("metric")
    table.add_column("value")
    for key in ("precision", "recall", "f1", "specificity", "auroc", "cohen_kappa", "invalid_rate"):
        table.add_row(key, f"{metrics[key]:.3f}")
    confusion = metrics["confusion"]
    table.add_row(
        "confusion",
        f"tp {confusion['tp']}  fp {confusion['fp']}  "
        f"fn {confusion['fn']}  tn {confusion['tn']}  invalid {metrics['invalid']}",
    )
    out_console.print(table)
    if json_out is not None:
        json_out.write_text(json.dumps(metrics, indent=2))
        out_console.print(f"metrics: {json_out}")


@judge_app.command("run")
def judge_run(
    pairs: Annotated[Path, typer.Argument(help="JSONL of {prompt, response} rows.")],
    judge: Annotated[str, typer.Option(help="The judge to run.")] = "refusal",
    role: Annotated[str, typer.Option(help="safety or refusal.")] = "safety",
    judge_model: JudgeModel = None,
    out: Annotated[Path | None, typer.Option(help="Write verdicts here (default: stdout).")] = None,
) -> None:
    """Judge every (prompt, response) row of a JSONL file; one verdict per line."""
    import json

    from flipsearch.judging import get_judge
    from flipsearch.prompts import _read_jsonl

    rows = _read_jsonl(pairs)
    for number, row in rows:
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise FlipsearchError(f"{pairs}:{number}: needs text 'prompt' and 'response'")
    verdicts = get_judge(judge, role, judge_model).judge(
        [(r["prompt"], r["response"]) for _, r in rows]
    )
    lines = "".join(
        json.dumps({**row, **v.to_dict()}, ensure_ascii=False) + "\n"
        for (_, row), v in zip(rows, verdicts, strict=True)
    )
    if out is None:
        sys.stdout.write(lines)
    else:
        out.write_text(lines)
        invalid = sum(v.invalid for v in verdicts)
        out_console.print(f"{len(verdicts)} verdicts ({invalid} invalid): {out}")


@contexts_app.command("list")
def contexts_list(
    contexts: ContextsDir = None,
    full: Annotated[bool, typer.Option(help="Show the whole text of each context.")] = False,
) -> None:
    """List the seed contexts (id, family, placement, tags, text)."""
    table = Table(show_lines=full)
    for column in ("id", "family", "placement"):
        table.add_column(column, no_wrap=True)
    for column in ("tags", "words", "text"):
        table.add_column(column, overflow="fold")
    library = load_contexts(contexts)
    for c in library:
        text = c.text if full else (c.text[:70] + "…" if len(c.text) > 70 else c.text)
        table.add_row(c.id, c.family, c.placement, ",".join(c.tags), str(len(c.text.split())), text)
    out_console.print(table)
    out_console.print(f"{len(library)} contexts")


def _summarise(result: RunResult) -> None:
    table = Table(title="leaderboard (search split; top 10)")
    for column in ("#", "context", "flip rate [95% CI]", "benign refusal", "held-out flip rate"):
        table.add_column(column)
    for record in result.leaderboard.head(10).to_dict(orient="records"):
        row = {str(k): v for k, v in record.items()}
        benign = _cell(row, "benign_refusal", "benign_refusal_count", "benign_refusal_n")
        if not row["feasible"]:
            benign += " over limit"
        pruned = " (pruned)" if row.get("state") == "pruned" else ""
        table.add_row(
            str(row["rank"]),
            str(row["context"]) + pruned,
            _cell(row, "flip_rate", "flip_rate_count", "flip_rate_n"),
            benign,
            _cell(row, "holdout_flip_rate", "holdout_flips", "holdout_pool"),
        )
    out_console.print(table)
    out_console.print(f"student unsafe rate (search split): {result.student_search.unsafe_rate}")
    if result.winner is not None:
        out_console.print(f"winner: [bold]{result.winner.context.id}[/bold]")
    generated = result.info["generated"]
    out_console.print(
        f"generated {generated['student']} student and {generated['teacher']} "
        f"teacher prompts in {result.info['seconds']} s (the rest came from the cache)"
    )
    out_console.print(f"report: {result.report_path.resolve()}")


def _cell(row: dict[str, Any], value: str, count: str, n: str) -> str:
    if row.get(value) is None or row[value] != row[value] or row.get(n) is None:
        return "–"
    return str(Rate.of(float(row[count]), float(row[n])))


def main() -> None:
    """Console entry point: user errors become one line and exit code 2."""
    try:
        app()
    except FlipsearchError as exc:
        err_console.print(
            f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print(
            "interrupted; everything generated so far is cached. Re-run the same command to resume."
        )
        sys.exit(130)


if __name__ == "__main__":
    main()
