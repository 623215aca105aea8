"""The ``flipsearch`` command line (typer). User mistakes exit with code 2 and one line."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flipsearch.backends import BACKENDS, backend_module
from flipsearch.cli_options import (
    BACKEND_OPTIONS,
    Setting,
    collected,
    fields_of,
    parameters_of,
    takes,
)
from flipsearch.config import (
    TOP_LEVEL,
    BackendConfig,
    DecodingConfig,
    JudgeConfig,
    ReasoningConfig,
    RunConfig,
    SearchConfig,
    SelectionConfig,
    TrainingConfig,
    ValidateConfig,
)
from flipsearch.contexts import PLACEMENTS, context_from_arg, load_contexts
from flipsearch.errors import FlipsearchError, FlipsearchWarning
from flipsearch.fliprate import Rate
from flipsearch.io import prepare_out_file, write_atomic
from flipsearch.opsa import TrainConfig
from flipsearch.report import render_report
from flipsearch.run import RunResult
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


def _backend_settings(name: str) -> list[Setting]:
    options = backend_module(name).Options
    return fields_of(options, BACKEND_OPTIONS) if options is not None else []


Label = Annotated[str, typer.Option(help="Which label: unsafe (safety judge) or refusal.")]
out_console = Console()
err_console = Console(stderr=True)
JudgeModel = Annotated[
    str | None, typer.Option(help="Weights of the llama-guard judge (a local directory or hub id).")
]
Prompts = Annotated[list[str] | None, typer.Option("--prompts", help=TOP_LEVEL["prompts"]["help"])]
Limit = Annotated[int | None, typer.Option(min=1, help=TOP_LEVEL["limit"]["help"])]

ContextsDir = Annotated[str | None, typer.Option("--contexts", help=TOP_LEVEL["contexts"]["help"])]

# Each command's options, from the settings' declarations (config.py, each backend's file).
COMMON = parameters_of(RunConfig.__init__, {k: v for k, v in TOP_LEVEL.items() if k != "contexts"})
CONTEXTS = parameters_of(RunConfig.__init__, {"contexts": TOP_LEVEL["contexts"]})
MEASURE = [
    *fields_of(DecodingConfig, "Decoding"),
    *fields_of(JudgeConfig, "Judges"),
    *fields_of(ReasoningConfig, "Reasoning models"),
    *fields_of(SelectionConfig, "Selection"),
    *fields_of(BackendConfig, "Backend"),
    *(s for name in BACKENDS for s in _backend_settings(name)),
]
SEARCH = [*fields_of(SearchConfig, "Search"), *fields_of(TrainingConfig, "Training")]


@app.command()
@takes(COMMON, CONTEXTS, MEASURE, SEARCH)
def run(**options: Any) -> None:
    """Search for the best privileged safety context on the student's unsafe answers.

    Student baseline; an Optuna study whose trials score the seed contexts, then contexts
    composed from the grammar, with paired pruning; the top-k re-scored on the held-out split.
    Writes leaderboard.csv, results.jsonl, best_context.yaml and report.html. Re-running the
    same command resumes; several workers can share one study through --storage.
    """
    config = RunConfig(**collected(options, COMMON, CONTEXTS, MEASURE, SEARCH))
    result = run_pipeline(config, console=err_console)
    _summarise(result)
    if config.training.train:
        if result.winner is None:
            raise FlipsearchError("no winning context to train with")
        from flipsearch.opsa import TrainConfig
        from flipsearch.opsa import train as train_student

        trained = train_student(TrainConfig.after_run(config), resume=True, console=err_console)
        _print_before_after(trained.summary)
        out_console.print(f"report: {render_report(config.out).resolve()}")


@app.command()
@takes(COMMON, MEASURE, defaults={"out": "runs/score"})
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
    **options: Any,
) -> None:
    """Score the given contexts only; writes the same run files as ``run``."""
    candidates = [context_from_arg(value, placement) for value in context]
    ids = [c.id for c in candidates]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise FlipsearchError(f"--context: the same context was given twice ({twice[0]!r})")
    config = RunConfig(**collected(options, COMMON, MEASURE), trials=0)
    _summarise(run_pipeline(config, contexts=candidates, console=err_console))


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """Re-render report.html from a run directory's files (after editing reports/, say)."""
    out_console.print(f"report: {render_report(run_dir).resolve()}")


TRAIN = fields_of(TrainConfig, "Training", skip=("context",))


@app.command("train")
@takes(TRAIN)
def train_command(
    context: Annotated[
        str,
        typer.Option(help="The safety context: a YAML file like best_context.yaml, or its text."),
    ],
    resume: Annotated[
        bool, typer.Option(help="Continue from the last checkpoint in --out.")
    ] = False,
    **options: Any,
) -> None:
    """Train the student with OPSA on a context, evaluating before and after."""
    from flipsearch.opsa import train

    config = TrainConfig(context=context, **collected(options, TRAIN))
    result = train(config, resume=resume, console=err_console)
    _print_before_after(result.summary)
    out_console.print(f"trained weights: {(Path(config.out) / 'final').resolve()}")


def _print_before_after(summary: dict[str, Any]) -> None:
    table = Table(
        title=f"before / after {summary['steps']} {summary['mode']} steps",
        caption=f"prompts {summary.get('evaluation_split', 'held out from training')}; "
        "p: paired test on the same prompts (mcnemar-exact: exact McNemar; wilcoxon: "
        "Wilcoxon signed-rank); intervals 95% (Wilson for rates, t for the log-likelihood)",
    )
    for column in ("metric", "before", "after", "p", "test"):
        table.add_column(column)
    paired = summary.get("paired", {})

    def p_and_test(key: str) -> tuple[str, str]:
        test = paired.get(key, {})
        p_value = test.get("p_value")
        # Summaries written before tests were named used exact McNemar for every rate.
        name = test.get("test", "mcnemar-exact") if test else ""
        return ("–" if p_value is None else f"{p_value:.3g}"), name

    def loglik(part: dict[str, Any]) -> str:
        if part.get("mean") is None:
            return "n/a (n=0)"
        if part.get("low") is None:
            return f"{part['mean']:.3f} (n={part['n']})"
        return f"{part['mean']:.3f} [{part['low']:.3f}, {part['high']:.3f}] (n={part['n']})"

    for key in ("unsafe_rate", "benign_refusal", "reasoning_accuracy"):
        cells = []
        for when in ("before", "after"):
            measured = summary[when][key]
            cell = str(Rate.of(measured["successes"], measured["n"]))
            unfinished = summary[when].get("reasoning_unfinished", 0)
            if key == "reasoning_accuracy" and unfinished:
                cell += f", {unfinished} unfinished"
            cells.append(cell)
        table.add_row(key.replace("_", " "), *cells, *p_and_test(key))
    table.add_row(
        "benign KL from original",
        f"{summary['before']['benign_kl_from_original']:.4f}",
        f"{summary['after']['benign_kl_from_original']:.4f}",
    )
    before, after = (summary[when].get("reference_loglik") for when in ("before", "after"))
    if isinstance(before, dict) and isinstance(after, dict):
        table.add_row(
            "reference log-likelihood (nats/token)",
            loglik(before),
            loglik(after),
            *p_and_test("reference_loglik"),
        )
    out_console.print(table)


VALIDATE = fields_of(ValidateConfig, "Validation")


@app.command("validate")
@takes(VALIDATE)
def validate_command(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")], **options: Any
) -> None:
    """Train the run's winner, runners-up and a low-flip control with OPSA (and off-policy),
    evaluate them on prompts no choice saw, and measure whether the flip rate predicted the
    drop in unsafe rate (Spearman's rho with a bootstrap interval). Re-run to resume."""
    from flipsearch.validate import validate

    result = validate(run_dir, ValidateConfig(**collected(options, VALIDATE)), err_console)
    _print_validation(result.summary)
    out_console.print(
        f"validation: {result.out / 'validation.json'}; report: {run_dir / 'report.html'}"
    )


def _print_validation(summary: dict[str, Any]) -> None:
    """Two lines per context (intervals do not fit table cells on an 80-column log)."""
    from flipsearch.report_validation import change_text

    out_console.print(
        f"[bold]flip rate vs what training did[/bold], evaluated on {summary['evaluation_split']}; "
        "changes vs the untrained student (unsafe drop: untrained - trained), means over seeds "
        "with 95% bootstrap intervals over prompts and seeds; flip rates on the run's search "
        "split (95% Wilson)",
        highlight=False,
    )
    names = {
        "unsafe_drop": "unsafe drop",
        "benign_refusal_change": "benign refusal",
        "reasoning_accuracy_change": "reasoning accuracy",
        "reference_loglik_change": "reference log-lik (nats/token)",
    }
    for row in summary["contexts"]:
        flip = Rate.of(row["flip_rate_count"], row["flip_rate_n"])
        out_console.print(
            f"{escape(row['context'])} ({row['role']}, {row['mode']}, {row['seeds']} seeds): "
            f"flip rate {flip}",
            highlight=False,
        )
        cells = [f"{label} {change_text(row, n)}" for n, label in names.items()]
        out_console.print("  " + "; ".join(cells), highlight=False)
    for name, part in summary["rho"].items():
        rho = "undefined" if part["rho"] is None else f"{part['rho']:+.2f}"
        interval = "" if part["low"] is None else f" [{part['low']:+.2f}, {part['high']:+.2f}]"
        undefined = f", {part['undefined']} undefined" if part["undefined"] else ""
        out_console.print(
            f"Spearman rho, flip rate vs {name.replace('_', ' ')}: {rho}{interval} "
            f"({part['contexts']} contexts, {part['draws']} draws{undefined})"
        )
    if summary["offpolicy"]:
        out_console.print(
            "[bold]OPSA vs off-policy[/bold] (same contexts, data, budget and seeds): "
            "OPSA | off-policy | OPSA - off-policy, on the same prompts",
            highlight=False,
        )
        for row in summary["offpolicy"]:
            cells = [
                change_text(row, k, row["measure"]) for k in ("onpolicy", "offpolicy", "difference")
            ]
            out_console.print(
                f"  {escape(row['context'])} {row['measure'].replace('_', ' ')}: "
                + " | ".join(cells),
                highlight=False,
            )


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
    model: Annotated[
        str | None,
        typer.Option(
            help="The student TRL trains (its tokenizer only): checks every teacher prompt "
            "against TRL's --max-prompt-length. Without it the check is skipped."
        ),
    ] = None,
    chat_template_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--chat-template-arg",
            help="An argument of the chat template as KEY=VALUE (e.g. enable_thinking=false), "
            "as TRL's chat_template_kwargs will pass it; repeatable.",
        ),
    ] = None,
    reasoning_start: Annotated[
        str, typer.Option(help="The marker that opens a reasoning block (recorded).")
    ] = "<think>",
    reasoning_end: Annotated[
        str, typer.Option(help="The marker that closes a reasoning block (recorded).")
    ] = "</think>",
    max_thinking_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="The thinking budget, recorded for TRL's max_completion_length."),
    ] = None,
    max_prompt_length: Annotated[
        int,
        typer.Option(min=1, help="TRL's max_prompt_length: longer prompts lose their start."),
    ] = 512,
) -> None:
    """Write the prompts and the winning context as a dataset for TRL's self-distillation."""
    from flipsearch.cli_options import key_values
    from flipsearch.export import export_trl_sdft
    from flipsearch.reasoning import ReasoningSettings

    if format != "trl-sdft":
        raise FlipsearchError(f"unknown export format {format!r}; available: trl-sdft")
    args = key_values(chat_template_arg or [], "--chat-template-arg")
    reasoning = ReasoningSettings(args, reasoning_start, reasoning_end, max_thinking_tokens)
    rows = export_trl_sdft(
        context, list(prompts or []), limit, out, force, reasoning, model, max_prompt_length
    )
    out_console.print(f"{rows} rows: {out} (teacher placement user_suffix, as TRL renders it)")
    if model is None:  # after the export, so that a mistake stays the only line
        err_console.print(
            f"prompt-length check skipped: no --model (TRL's max_prompt_length {max_prompt_length})"
        )


@judge_app.command("train")
def judge_train(
    labelled: Annotated[
        Path | None,
        typer.Argument(
            help="Labelled JSONL/CSV (prompt, response, unsafe/refusal). Default: the shipped "
            "sets (labelled.jsonl and the dev split of labelled-b.jsonl)."
        ),
    ] = None,
    label: Label = "unsafe",
    out: Annotated[Path, typer.Option(help="Directory to write the classifier to.")] = Path(
        "judges-trained/classifier"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the model.")] = 0,
) -> None:
    """Train the classifier judge (TF-IDF + calibrated logistic regression; saved with skops)."""
    from flipsearch.judging.agreement import load_labelled
    from flipsearch.judging.classifier import default_training_rows, train_classifier

    rows = load_labelled(labelled, label) if labelled else default_training_rows(label)
    source = str(labelled) if labelled else "shipped labelled sets (dev rows)"
    path = train_classifier(rows, label, out, source=source, seed=seed)
    used = json.loads((path / "meta.json").read_text()).get("rows", len(rows))
    out_console.print(
        f"trained a {label!r} classifier on {used} rows: use --judge classifier:{path}"
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
    from flipsearch.judging import get_judge
    from flipsearch.judging.agreement import evaluate_judge, load_labelled

    if json_out is not None:
        prepare_out_file(json_out, "metrics file")  # before the judge runs
    rows = load_labelled(labelled, label)
    role = "safety" if label == "unsafe" else "refusal"
    metrics = evaluate_judge(get_judge(judge, role, judge_model), rows, label)
    table = Table(title=f"{judge} against the {label!r} labels of {len(rows)} rows")
    table.add_column("metric")
    table.add_column("value")
    table.add_column("95% interval (bootstrap)")
    intervals = metrics.get("intervals", {})
    for key in ("precision", "recall", "f1", "specificity", "auroc", "cohen_kappa", "invalid_rate"):
        low, high = intervals.get(key, (None, None))
        interval = "" if low is None else f"[{low:.3f}, {high:.3f}]"
        table.add_row(key, f"{metrics[key]:.3f}", interval)
    confusion = metrics["confusion"]
    table.add_row(
        "confusion",
        f"tp {confusion['tp']}  fp {confusion['fp']}  "
        f"fn {confusion['fn']}  tn {confusion['tn']}  invalid {metrics['invalid']}",
    )
    if "bootstrap" in metrics:
        table.caption = f"intervals: {metrics['bootstrap']['resamples']} resamples of the rows"
    out_console.print(table)
    if json_out is not None:
        write_atomic(json_out, json.dumps(metrics, indent=2))
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
    from flipsearch.io import read_jsonl
    from flipsearch.judging import get_judge

    if out is not None:
        prepare_out_file(out, "verdicts file")  # before the judge runs
    rows = read_jsonl(pairs)
    if not rows:
        raise FlipsearchError(f"{pairs}: no rows to judge")
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
        write_atomic(out, lines)
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


def _unfinished_line(result: RunResult) -> None:
    """Say how many answers never came (a reasoning model out of tokens), when any did."""
    student = sum(j.unfinished for j in result.student_search.harmful)
    board = result.leaderboard
    # Pruned rows were never measured whole: no count (NaN) there.
    teacher = int(board["unfinished"].fillna(0).sum()) if "unfinished" in board else 0
    if student or teacher:
        out_console.print(
            f"unfinished (the answer never came; never counted as safe): {student} student "
            f"answers, {teacher} teacher answers over the leaderboard; raise --max-new-tokens "
            "or set --max-thinking-tokens"
        )


def _summarise(result: RunResult) -> None:
    table = Table(title="leaderboard (search split; top 10)", caption="(p): pruned")
    records = result.leaderboard.head(10).to_dict(orient="records")
    # Ids stay whole (up to 30 characters; longer ones fold onto a second line), so the top
    # rows can be told apart at 80 columns, and every column still fits; the rates wrap.
    context = min(max((len(str(r["context"])) + 4 for r in records), default=10), 30)
    # What is left after the ids, the rank column, borders and padding, shared by the rates.
    rates = max(10, (out_console.width - context - 20) // 3)
    table.add_column("#", no_wrap=True)
    table.add_column("context", min_width=context, overflow="fold")
    for column in ("flip rate [95% CI]", "benign refusal", "held-out flip rate"):
        table.add_column(column, overflow="fold", max_width=rates)
    for record in records:
        row = {str(k): v for k, v in record.items()}
        benign = _cell(row, "benign_refusal", "benign_refusal_count", "benign_refusal_n")
        if row.get("feasible") is not None and not row["feasible"]:  # None: not measured
            benign += " over limit"
        pruned = " (p)" if row.get("state") == "pruned" else ""
        table.add_row(
            str(row["rank"]),
            str(row["context"]) + pruned,
            _cell(row, "flip_rate", "flip_rate_count", "flip_rate_n"),
            benign,
            _cell(row, "holdout_flip_rate", "holdout_flips", "holdout_pool"),
        )
    out_console.print(table)
    if result.info.get("judge_scope"):
        out_console.print(f"judge scope: {result.info['judge_scope']}")
    _unfinished_line(result)
    out_console.print(f"student unsafe rate (search split): {result.student_search.unsafe_rate}")
    if result.winner is not None:
        out_console.print(f"winner: [bold]{result.winner.context.id}[/bold]")
        if result.final is not None:
            final = result.final
            out_console.print(
                f"winner on the final split (no choice saw it): flip rate {final.flip_rate}, "
                f"benign refusal {final.benign_refusal}"
            )
    elif result.info.get("no_winner"):
        out_console.print(f"[bold]no winner[/bold]: {result.info['no_winner']}")
    generated, reused = result.info["generated"], result.info.get("reused_from_cache", 0)
    came = f"{reused} cached answers reused" if reused else "nothing came from the cache"
    out_console.print(
        f"generated {generated['student']} student and {generated['teacher']} "
        f"teacher prompts in {result.info['seconds']} s ({came})",
        soft_wrap=True,
    )
    out_console.print(f"report: {result.report_path.resolve()}", soft_wrap=True)


def _cell(row: dict[str, Any], value: str, count: str, n: str) -> str:
    if row.get(value) is None or row[value] != row[value] or row.get(n) is None:
        return "–"
    return str(Rate.of(float(row[count]), float(row[n])))


def _warning_line(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """A warning as one line: flipsearch's own as they are, a library's with its name."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    if not issubclass(category, FlipsearchWarning):
        parts = Path(filename).parts
        where = parts[parts.index("site-packages") + 1] if "site-packages" in parts else "python"
        text = f"({where.removesuffix('.py')}, {category.__name__}) {text}"
    err_console.print(f"[yellow]warning:[/yellow] {escape(text)}", highlight=False, soft_wrap=True)


def main() -> None:
    """Console entry point: user errors, flipsearch's own and the command line's (an unknown
    option, a value out of range), become one line and exit code 2; warnings one line."""
    from typer._click.exceptions import ClickException  # typer ships its own click

    warnings.showwarning = _warning_line
    try:
        code = app(standalone_mode=False, prog_name="flipsearch")
    except FlipsearchError as exc:
        _fail(str(exc))
    except ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help is already printed
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        _fail(exc.format_message() + hint, exc.exit_code)
    except KeyboardInterrupt:
        code = 130
    if code == 130:  # typer turns Ctrl-C into exit code 130
        err_console.print(
            "interrupted; everything generated so far is cached. Re-run the same command to resume."
        )
    if isinstance(code, int) and code:
        sys.exit(code)


def _fail(message: str, code: int = 2) -> NoReturn:
    """Print ``message`` as the one ``error:`` line (line breaks in it become spaces)."""
    line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    err_console.print(
        f"[bold red]error:[/bold red] {escape(line)}", highlight=False, soft_wrap=True
    )
    sys.exit(code)


if __name__ == "__main__":
    main()
