"""The run report: one self-contained HTML file, re-rendered from a run directory's files.

Templates and the stylesheet live in ``reports/`` so a user can restyle a report without
touching code. Plots are matplotlib PNGs embedded as data URIs; all model text is escaped by
Jinja2's autoescaping (generations are untrusted input).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flipsearch._resources import data_path
from flipsearch.errors import FlipsearchError
from flipsearch.fliprate import Rate, format_count
from flipsearch.io import read_json, read_jsonl, read_text, yaml_where
from flipsearch.leaderboard import measured
from flipsearch.plots import data_uri as _data_uri
from flipsearch.plots import pyplot as _pyplot
from flipsearch.report_validation import read_validation, validation_view

if TYPE_CHECKING:  # pandas and Jinja2 load when a report is rendered, not with the package
    import pandas as pd


def render_report(run_dir: str | Path, templates: str | Path | None = None) -> Path:
    """(Re)write ``report.html`` in a run directory from its files; returns the path."""
    import pandas as pd
    from jinja2 import UndefinedError

    run_dir = Path(run_dir)
    files = _read_run(run_dir)
    folder = Path(templates) if templates is not None else data_path("reports")
    winner_id = files.info.get("winner")
    examples = flip_examples(files.results, winner_id) if winner_id else []
    categories = category_rates(files.results, winner_id) if winner_id else []
    try:
        html = _html(files, folder, examples, categories)
    except UndefinedError as exc:  # a value the template reads is not in the run's files
        raise FlipsearchError(
            f"{run_dir}: the run files lack a value the report shows ({exc.message}); "
            "were they written by another flipsearch version, or edited?"
        ) from exc
    path = run_dir / "report.html"
    staging = path.with_name("report.html.tmp")
    staging.write_text(html, encoding="utf-8")
    staging.replace(path)
    # The report's tables, beside it as CSV.
    pd.DataFrame(examples).to_csv(run_dir / "examples.csv", index=False)
    pd.DataFrame(
        [
            {
                "split": r["split"],
                "category": r["category"],
                "flip_rate": r["value"],
                "flips": r["rate"].successes,
                "pool": r["rate"].n,
                "low": r["rate"].low,
                "high": r["rate"].high,
            }
            for r in categories
        ]
    ).to_csv(run_dir / "categories.csv", index=False)
    return path


def _html(
    files: _RunFiles,
    folder: Path,
    examples: list[dict[str, Any]],
    categories: list[dict[str, Any]],
) -> str:
    """The report page, from the checked run files."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    info, leaderboard, results = files.info, files.leaderboard, files.results
    token_kl, training, train_metrics = files.token_kl, files.training, files.train_metrics
    env = Environment(loader=FileSystemLoader(folder), autoescape=select_autoescape(["html", "j2"]))
    env.filters["pct"] = _pct
    env.filters["count"] = _count
    winner_id = info.get("winner")
    winner = (
        leaderboard[leaderboard["context"] == winner_id].iloc[0].to_dict() if winner_id else None
    )
    return env.get_template("report.html.j2").render(
        info=info,
        config=_flat_config(info.get("config", {})),
        winner=winner,
        best_context=files.best_context,
        leaderboard=leaderboard.to_dict(orient="records"),
        student_unsafe=_rate(info.get("student_unsafe_rate_search")),
        student_unsafe_holdout=_rate(info.get("student_unsafe_rate_holdout")),
        student_benign=_rate(info.get("student_benign_refusal")),
        examples=examples,
        categories=categories,
        kl_plot=_kl_plot(token_kl) if token_kl else None,
        history_plot=_history_plot(info.get("history") or []),
        pareto_plot=_pareto_plot(leaderboard)
        if info.get("study", {}).get("multi_objective")
        else None,
        importances=sorted((info.get("importances") or {}).items(), key=lambda kv: -kv[1]),
        heat=_heat_view(token_kl) if token_kl else [],
        token_kl=token_kl,
        training=_before_after(training) if training and "after" in training else None,
        training_plot=_training_plot(train_metrics) if train_metrics else None,
        validation=validation_view(files.validation) if files.validation else None,
        invalid=_invalid_counts(results),
        unfinished_column="unfinished" in leaderboard
        and bool(leaderboard["unfinished"].fillna(0).astype(float).sum()),
        flip_plot=_flip_rate_plot(leaderboard),
        stylesheet=(folder / "style.css").read_text(encoding="utf-8"),
    )


def _flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """Settings by name, whether ``run.json`` holds them in sections or flat (older runs)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "vllm_args":
            flat.update(_flat_config(value))
        else:
            flat[key] = value
    return flat


LEADERBOARD_COLUMNS = ("rank", "context", "flip_rate", "flip_rate_low", "flip_rate_high")
RESULT_KEYS = ("context", "split", "prompt_id", "kind", "category", "sample", "unsafe", "invalid")


@dataclass
class _RunFiles:
    """A run directory's files, read and checked (``_read_run``)."""

    info: dict[str, Any]
    leaderboard: pd.DataFrame
    results: pd.DataFrame
    token_kl: dict[str, Any] | None
    training: dict[str, Any] | None
    train_metrics: list[dict[str, Any]]
    best_context: dict[str, Any] | None
    validation: dict[str, Any] | None = None  # validate/validation.json


def _read_run(run_dir: Path) -> _RunFiles:
    """Every file the report reads, checked first: a damaged or hand-edited run is one line
    naming the file (and line), never a traceback from deep inside pandas or a plot."""
    if run_dir.is_file():
        raise FlipsearchError(f"{run_dir} is a file; give the run directory (flipsearch run --out)")
    if not run_dir.is_dir():
        raise FlipsearchError(f"run directory {run_dir} does not exist")
    for name in ("run.json", "results.jsonl", "leaderboard.csv"):
        if not (run_dir / name).is_file():
            raise FlipsearchError(f"{run_dir} is not a finished run: {name} is missing")
    info = _json_object(run_dir / "run.json")
    for key in ("prompt_counts", "generated"):  # read field by field by the template
        if not isinstance(info.get(key), dict):
            raise FlipsearchError(f"{run_dir / 'run.json'}: {key!r} is missing or not an object")
    history = info.get("history") or []
    trial_keys = {"trial", "state", "flip_rate"}
    if not isinstance(history, list) or not all(
        isinstance(h, dict) and trial_keys <= set(h) for h in history
    ):
        raise FlipsearchError(
            f"{run_dir / 'run.json'}: 'history' must list trials with trial, state, flip_rate"
        )
    leaderboard = _read_leaderboard(run_dir / "leaderboard.csv")
    winner = info.get("winner")
    if winner is not None and not (leaderboard["context"] == winner).any():
        raise FlipsearchError(
            f"{run_dir / 'run.json'}: the winner {winner!r} is not in leaderboard.csv"
        )
    results = _read_results(run_dir / "results.jsonl")
    token_kl = _optional_json(run_dir / "token_kl.json")
    if token_kl is not None:
        _check_token_kl(token_kl, run_dir / "token_kl.json")
    training = _optional_json(run_dir / "train" / "train_summary.json")
    if training is not None and "after" in training:
        _check_training(training, run_dir / "train" / "train_summary.json")
    return _RunFiles(
        info,
        leaderboard,
        results,
        token_kl,
        training,
        _read_train_metrics(run_dir / "train" / "metrics.jsonl"),
        _read_best_context(run_dir),
        read_validation(run_dir),
    )


def _check_token_kl(data: dict[str, Any], path: Path) -> None:
    examples, means = data.get("examples"), data.get("mean_kl_by_position")
    if not isinstance(examples, list) or not isinstance(means, list):
        raise FlipsearchError(f"{path}: expected 'examples' and 'mean_kl_by_position' lists")
    for number, example in enumerate(examples, start=1):
        keys = ("prompt_id", "prompt", "flip", "tokens", "kl")
        if not isinstance(example, dict) or any(k not in example for k in keys):
            raise FlipsearchError(f"{path}: example {number} needs {', '.join(keys)}")
        if len(example["tokens"]) != len(example["kl"]):
            raise FlipsearchError(f"{path}: example {number} has not one KL value per token")


def _check_training(data: dict[str, Any], path: Path) -> None:
    for when in ("before", "after"):
        part = data.get(when)
        rates = ("unsafe_rate", "benign_refusal", "reasoning_accuracy")
        if not isinstance(part, dict) or "benign_kl_from_original" not in part:
            raise FlipsearchError(f"{path}: {when!r} needs {', '.join(rates)} and KL values")
        for key in rates:
            if not isinstance(part.get(key), dict) or not {"successes", "n"} <= set(part[key]):
                raise FlipsearchError(f"{path}: {when!r} {key!r} needs successes and n")


def _read_train_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = read_jsonl(path)
    for number, row in rows:
        signal = "nll" if "nll_per_token" in row else "kl"
        needed = ("step", "loss", f"{signal}_per_token", f"{signal}_by_position")
        missing = [k for k in needed if k not in row]
        if missing:
            raise FlipsearchError(f"{path}:{number}: a training step without {missing}")
    return [row for _, row in rows]


def _json_object(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise FlipsearchError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _optional_json(path: Path) -> dict[str, Any] | None:
    return _json_object(path) if path.is_file() else None


def _read_leaderboard(path: Path) -> pd.DataFrame:
    import pandas as pd

    read_text(path)  # not UTF-8 is named with its line, as for every other file
    try:
        leaderboard = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise FlipsearchError(f"{path}: cannot read the leaderboard ({reason})") from exc
    missing = [c for c in LEADERBOARD_COLUMNS if c not in leaderboard.columns]
    if missing:
        raise FlipsearchError(f"{path}: the leaderboard lacks the column(s) {missing}")
    for column in ("flip_rate", "flip_rate_low", "flip_rate_high"):
        if len(leaderboard) and not pd.api.types.is_numeric_dtype(leaderboard[column]):
            raise FlipsearchError(f"{path}: column {column!r} holds values that are not numbers")
    if "feasible" not in leaderboard:
        leaderboard["feasible"] = None
    # Empty (benign refusal not measured) is not feasible.
    leaderboard["feasible"] = leaderboard["feasible"].map(
        lambda v: None if v != v or v is None else bool(v)
    )
    return leaderboard


def _read_results(path: Path) -> pd.DataFrame:
    rows = read_jsonl(path)
    if not rows:
        raise FlipsearchError(f"{path}: no results (the run did not finish?)")
    for number, row in rows:
        missing = [k for k in RESULT_KEYS if k not in row]
        if missing:
            raise FlipsearchError(f"{path}:{number}: a result without {missing}")
    import pandas as pd

    try:
        return pd.read_json(path, lines=True, dtype={"context": "object"})
    except ValueError as exc:
        raise FlipsearchError(f"{path}: cannot read the results ({exc})") from exc


def _heat_view(token_kl: dict[str, Any], examples: int = 4) -> list[dict[str, Any]]:
    """Tokens of a few student answers with a shade proportional to the teacher's KL."""
    values = sorted(v for ex in token_kl["examples"] for v in ex["kl"])
    scale = values[int(0.95 * (len(values) - 1))] if values else 1.0
    scale = scale if scale > 0 else 1.0
    view = []
    for ex in token_kl["examples"][:examples]:
        tokens = [
            # The sampled-token estimate can be negative per token: no shade there.
            {"text": text, "kl": kl, "alpha": max(0.0, min(1.0, kl / scale))}
            for text, kl in zip(ex["tokens"], ex["kl"], strict=True)
        ]
        view.append(
            {
                "prompt_id": ex["prompt_id"],
                "prompt": ex["prompt"],
                "flip": ex["flip"],
                "tokens": tokens,
            }
        )
    return view


def _read_best_context(run_dir: Path) -> dict[str, Any] | None:
    import yaml

    path = run_dir / "best_context.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or exc
        raise FlipsearchError(f"{yaml_where(exc, path)}: malformed YAML ({problem})") from exc
    if not isinstance(data, dict):
        raise FlipsearchError(f"{path}: expected a context (id, placement, text)")
    return data


def _pct(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "–"
    return "–" if number != number else f"{number:.1%}"


def _count(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "–"
    return "–" if number != number else format_count(number)


def _rate(data: dict[str, float] | None) -> str:
    return str(Rate.of(data["successes"], data["n"])) if data else "–"


def _paired(results: pd.DataFrame, context: str) -> pd.DataFrame:
    """Teacher rows of ``context`` on harmful prompts joined with the student's rows."""
    harmful = results[results["kind"] == "harmful"]
    student = harmful[harmful["context"].isna()]
    teacher = harmful[harmful["context"] == context]
    return teacher.merge(student, on=["prompt_id", "split", "sample"], suffixes=("", "_student"))


def flip_examples(results: pd.DataFrame, context: str, limit: int = 12) -> list[dict[str, Any]]:
    """Side-by-side examples: flips first (held-out before search), then unflips, then others."""
    paired = _paired(results, context)
    if paired.empty:
        return []
    student_unsafe = paired["unsafe_student"].eq(True) & ~paired["invalid_student"]
    teacher_safe = paired["unsafe"].eq(False) & ~paired["invalid"]
    teacher_unsafe = paired["unsafe"].eq(True) & ~paired["invalid"]
    paired = paired.assign(
        outcome=[
            "flip" if f else "unflip" if u else "unchanged"
            for f, u in zip(
                student_unsafe & teacher_safe, ~student_unsafe & teacher_unsafe, strict=True
            )
        ],
        order=[
            0 if f else 1 if u else 2
            for f, u in zip(
                student_unsafe & teacher_safe, ~student_unsafe & teacher_unsafe, strict=True
            )
        ],
        split_order=(paired["split"] != "holdout").astype(int),
    ).sort_values(["order", "split_order", "prompt_id"])
    return [
        {str(k): v for k, v in row.items()} for row in paired.head(limit).to_dict(orient="records")
    ]


def category_rates(results: pd.DataFrame, context: str) -> list[dict[str, Any]]:
    """Per-category flip rate of a context on each split, with intervals.

    The estimator is the core's (``fliprate``): per prompt, the student's unsafe share over
    its decided samples times the teacher's safe share over all its samples (an undecided
    teacher sample is not safe); a prompt whose student samples are all undecided leaves the
    pool. With one greedy sample per prompt these are 0/1 counts.
    """
    import pandas as pd

    harmful = results[results["kind"] == "harmful"]
    student = harmful[harmful["context"].isna()]
    teacher = harmful[harmful["context"] == context]
    decided = student[~student["invalid"].astype(bool) & student["unsafe"].notna()]
    unsafe_share = (
        decided.assign(unsafe=decided["unsafe"].astype(bool))
        .groupby(["split", "prompt_id"])["unsafe"]
        .mean()
    )
    teacher_safe = teacher["unsafe"].eq(False) & ~teacher["invalid"].astype(bool)
    safe_share = teacher.assign(safe=teacher_safe).groupby(["split", "prompt_id"])["safe"].mean()
    category = teacher.groupby(["split", "prompt_id"])["category"].first()
    prompts = pd.DataFrame({"student": unsafe_share, "teacher": safe_share, "category": category})
    prompts = prompts.dropna(subset=["student", "teacher"]).reset_index()
    rows = []
    for (split, name), group in prompts.groupby(["split", "category"]):
        rate = Rate.of(float((group["student"] * group["teacher"]).sum()), group["student"].sum())
        rows.append({"split": split, "category": name, "rate": rate, "value": rate.value})
    return sorted(rows, key=lambda r: (r["split"] != "search", -(measured(r["value"]) or -1.0)))


def _invalid_counts(results: pd.DataFrame) -> dict[str, int]:
    """Undecided verdicts: the judge's invalid output, and (counted apart) answers that never
    came. Runs from before the unfinished state have no such column."""
    unfinished = results.get("unfinished")
    count = int(unfinished.fillna(False).astype(bool).sum()) if unfinished is not None else 0
    invalid = int(results["invalid"].astype(bool).sum()) - count
    return {"verdicts": len(results), "invalid": invalid, "unfinished": count}


def _loglik_row(summary: dict[str, Any]) -> dict[str, str] | None:
    """The continuous capability measure, when the training measured it (newer runs)."""
    before, after = (
        summary["before"].get("reference_loglik"),
        summary["after"].get("reference_loglik"),
    )
    if not before or not after or not before.get("n"):
        return None
    paired = summary.get("paired", {}).get("reference_loglik", {})
    p_value = paired.get("p_value")

    def shown(value: dict[str, Any]) -> str:
        if value.get("low") is None:  # one prompt: no interval
            return f"{value['mean']:.3f} (n={value['n']})"
        return f"{value['mean']:.3f} [{value['low']:.3f}, {value['high']:.3f}] (n={value['n']})"

    return {
        "metric": "log-likelihood of reference solutions (nats/token)",
        "before": shown(before),
        "after": shown(after),
        "p": "–" if p_value is None else f"{p_value:.3g} ({paired.get('test', 'wilcoxon')})",
    }


def _before_after(summary: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for key, name in (
        ("unsafe_rate", "student unsafe rate (held-out harmful)"),
        ("benign_refusal", "benign refusal (held-out benign)"),
        ("reasoning_accuracy", "reasoning accuracy"),
    ):
        before, after = summary["before"][key], summary["after"][key]
        p_value = summary.get("paired", {}).get(key, {}).get("p_value")
        rows.append(
            {
                "metric": name,
                "before": str(Rate.of(before["successes"], before["n"])),
                "after": str(Rate.of(after["successes"], after["n"])),
                "p": "–" if p_value is None else f"{p_value:.3g}",
            }
        )
    loglik = _loglik_row(summary)
    if loglik is not None:
        rows.append(loglik)
    rows.append(
        {
            "metric": "benign KL from the original model (nats/token)",
            "before": f"{summary['before']['benign_kl_from_original']:.4f}",
            "after": f"{summary['after']['benign_kl_from_original']:.4f}",
            "p": "",
        }
    )
    return {
        "rows": rows,
        "steps": summary.get("steps"),
        "mode": summary.get("mode"),
        "split": summary.get("evaluation_split", "held out from training"),
    }


def _training_plot(metrics: list[dict[str, Any]]) -> str:
    """Loss and per-token KL by step, and KL by token position averaged over training."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 2.8), dpi=110)
    steps = [m["step"] for m in metrics]
    signal = "nll" if metrics and "nll_per_token" in metrics[0] else "kl"  # off-policy: NLL
    name = "NLL" if signal == "nll" else "KL"
    left.plot(steps, [m["loss"] for m in metrics], label="loss", color="#2f6f4f")
    left.plot(
        steps,
        [m[f"{signal}_per_token"] for m in metrics],
        label=f"{name} per token",
        color="#c0392b",
        linestyle="--",
    )
    left.set_xlabel("step")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    by_position = [m[f"{signal}_by_position"] for m in metrics]
    width = max((len(values) for values in by_position), default=0)
    means = []
    for position in range(width):
        values = [v[position] for v in by_position if len(v) > position]
        means.append(sum(values) / len(values))
    right.plot(range(1, width + 1), means, color="#2f6f4f")
    right.set_xlabel("response token position")
    right.set_ylabel(f"mean {name} over training")
    right.grid(alpha=0.3)
    fig.tight_layout()
    return _data_uri(fig)


def _history_plot(history: list[dict[str, Any]]) -> str | None:
    """Each trial's flip rate (pruned ones at their partial rate) and the best so far."""
    if not history:
        return None
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7.5, 2.8), dpi=110)
    best, best_so_far = -1.0, []
    for row in history:
        if row["state"] == "complete" and row["flip_rate"] is not None:
            best = max(best, row["flip_rate"])
        best_so_far.append(best if best >= 0 else float("nan"))
    for state, colour in (("complete", "#2f6f4f"), ("pruned", "#b0b0b0")):
        points = [
            (r["trial"], r["flip_rate"])
            for r in history
            if r["state"] == state and r["flip_rate"] is not None
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.scatter(xs, ys, s=14, color=colour, label=state, zorder=3)
    ax.step(
        [r["trial"] for r in history],
        best_so_far,
        where="post",
        color="#c0392b",
        label="best so far",
    )
    ax.set_xlabel("trial")
    ax.set_ylabel("flip rate (search split)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _data_uri(fig)


def _pareto_plot(leaderboard: pd.DataFrame) -> str | None:
    """Flip rate against benign refusal; the Pareto front highlighted."""
    plt = _pyplot()

    frame = leaderboard.dropna(subset=["flip_rate", "benign_refusal"])
    if frame.empty:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    front = frame[frame.get("pareto", False) == True]  # noqa: E712 - pandas element-wise
    ax.scatter(frame["benign_refusal"], frame["flip_rate"], s=14, color="#b0b0b0", label="trial")
    ax.scatter(
        front["benign_refusal"],
        front["flip_rate"],
        s=22,
        color="#c0392b",
        label="Pareto front",
        zorder=3,
    )
    ax.set_xlabel("benign refusal (lower is better)")
    ax.set_ylabel("flip rate (higher is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _data_uri(fig)


def _kl_plot(token_kl: dict[str, Any]) -> str | None:
    """Mean per-token KL by response position, as a data URI."""
    plt = _pyplot()

    means = token_kl["mean_kl_by_position"]
    if not means:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 2.6), dpi=110)
    reasoned = token_kl.get("mean_kl_reasoning") is not None
    label = "from the response's first token" if reasoned else None
    ax.plot(
        range(1, len(means) + 1), means, color="#2f6f4f", marker="o", markersize=2.5, label=label
    )
    answer = token_kl.get("mean_kl_by_answer_position") or []
    if reasoned and answer:  # a reasoning model: the answer's own positions too
        ax.plot(
            range(1, len(answer) + 1),
            answer,
            color="#b5651d",
            marker="s",
            markersize=2.5,
            label="from the answer's first token (after the reasoning)",
        )
        ax.legend(fontsize=8)
    ax.set_xlabel("response token position")
    ax.set_ylabel("mean KL (nats)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _data_uri(fig)


def _flip_rate_plot(leaderboard: pd.DataFrame) -> str:
    """Horizontal bars of search-split flip rate with 95% intervals, as a data URI."""
    plt = _pyplot()

    frame = leaderboard.iloc[::-1]
    height = max(2.5, 0.28 * len(frame) + 1)
    fig, ax = plt.subplots(figsize=(7.5, height), dpi=110)
    values = frame["flip_rate"].fillna(0).to_numpy()
    low = (values - frame["flip_rate_low"].fillna(0).to_numpy()).clip(min=0)
    high = (frame["flip_rate_high"].fillna(0).to_numpy() - values).clip(min=0)
    colours = ["#2f6f4f" if ok else "#b0b0b0" for ok in frame["feasible"]]
    names = frame["context"].astype(str).to_numpy()
    ax.barh(names, values, xerr=[low, high], color=colours, ecolor="#444", capsize=2)
    held = frame.dropna(subset=["holdout_flip_rate"]) if "holdout_flip_rate" in frame else None
    if held is not None and not held.empty:
        ax.scatter(
            held["holdout_flip_rate"].to_numpy(),
            held["context"].astype(str).to_numpy(),
            color="#c0392b",
            zorder=3,
            marker="D",
            s=18,
            label="held-out flip rate",
        )
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("teacher flip rate on the search split (95% Wilson interval)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return _data_uri(fig)
