"""Progress outside a terminal: a line per finished step, a line a minute on long work; warnings
as one line; the leaderboard readable at 80 columns."""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.progress import Progress

from flipsearch import progress as progress_module
from flipsearch.progress import LineProgress, make_progress


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=100, force_terminal=False), buffer


def test_a_terminal_gets_rich_progress_and_anything_else_plain_lines():
    console, _ = _console()
    assert isinstance(make_progress(console), LineProgress)
    assert isinstance(make_progress(Console(file=io.StringIO(), force_terminal=True)), Progress)


def test_a_finished_step_prints_one_line_and_short_calls_print_none(monkeypatch):
    console, buffer = _console()
    with LineProgress(console) as progress:
        steps = progress.add_task("search trials", total=2)
        progress.advance(steps)
        assert buffer.getvalue() == ""
        progress.advance(steps)
        progress.update(steps, completed=2)  # finished once, said once
        quick = progress.add_task("student: 8 prompts", total=8)
        progress.advance(quick, 8)
        progress.remove_task(quick)
        monkeypatch.setattr(progress_module, "QUIET_SECONDS", 0.0)
        open_ended = progress.add_task("teacher: 4 prompts")  # no total: said when removed
        progress.remove_task(open_ended)
    lines = buffer.getvalue().splitlines()
    assert lines[0].startswith("done: search trials (") and len(lines) == 3
    assert lines[1].startswith("done: student: 8 prompts")
    assert lines[2].startswith("done: teacher: 4 prompts")


def test_long_work_prints_a_line_every_heartbeat():
    console, buffer = _console()
    with LineProgress(console, heartbeat=0.05) as progress:
        task = progress.add_task("student: 64 prompts", total=64)
        progress.advance(task, 16)
        time.sleep(0.3)
    beats = [line for line in buffer.getvalue().splitlines() if line.startswith("working:")]
    assert len(beats) >= 2
    assert "student: 64 prompts 16/64" in beats[0]


def test_warnings_become_one_line_naming_their_source(monkeypatch):
    from flipsearch import cli
    from flipsearch.errors import FlipsearchWarning

    console, buffer = _console()
    monkeypatch.setattr(cli, "err_console", console)
    cli._warning_line("cache damaged: moved aside\nmore detail", FlipsearchWarning, "x.py", 1)
    cli._warning_line(
        "Converting a tensor\nConsider detach", UserWarning, "/v/site-packages/torch/t.py", 9
    )
    lines = buffer.getvalue().splitlines()
    assert lines == [
        "warning: cache damaged: moved aside",
        "warning: (torch, UserWarning) Converting a tensor",
    ]


def test_parameter_importances_warn_nothing_with_few_trials():
    import optuna

    from flipsearch.run import _importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_float("y", 0, 1), n_trials=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning that leaked would fail here
        assert set(_importances(study)) <= {"x", "y"}


def test_the_leaderboard_keeps_context_ids_whole_at_80_columns(monkeypatch):
    from flipsearch import cli
    from flipsearch.evaluate import StudentBaseline
    from flipsearch.run import RunResult

    ids = ["refusal-no-exact-sentence", "refusal-no-exact-sentence-b"]
    rows = [
        {
            "rank": i + 1,
            "context": context,
            "state": "pruned" if i else "complete",
            "flip_rate": 0.6875,
            "flip_rate_count": 11,
            "flip_rate_n": 16,
            "benign_refusal": 0.25,
            "benign_refusal_count": 4,
            "benign_refusal_n": 16,
            "feasible": True,
            "holdout_flip_rate": 1.0,
            "holdout_flips": 9,
            "holdout_pool": 9,
        }
        for i, context in enumerate(ids)
    ]
    info = {"generated": {"student": 1, "teacher": 2}, "seconds": 1.0, "reused_from_cache": 0}
    result = RunResult(
        Path("r"),
        StudentBaseline([], []),
        StudentBaseline([], []),
        [],
        [],
        pd.DataFrame(rows),
        None,
        info,
    )
    buffer = io.StringIO()
    monkeypatch.setattr(cli, "out_console", Console(file=buffer, width=80))
    cli._summarise(result)
    text = buffer.getvalue()
    assert all(line and len(line) <= 80 for line in text.splitlines() if line.strip())
    borders = [line for line in text.splitlines() if line.startswith(("│", "┃", "┏", "└"))]
    assert borders and all(line.rstrip()[-1] in "│┃┓┘" for line in borders)  # no column cut
    assert "held-out" in text
    for context in ids:
        assert context in text.replace("│\n│", "")  # whole (a long id may fold in its cell)
    assert "nothing came from the cache" in text
