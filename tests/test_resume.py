"""Nothing lost, nothing mixed: a run SIGKILLed at any moment and resumed gives the same
leaderboard, winner and trial count as an uninterrupted one; a run directory refuses other
settings; damaged state is recovered; secrets never reach the run files."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from tests.helpers import tiny_cli_args

# A library-driven run whose safety and refusal judges are the refusal judge, but stop for as
# long as the test needs when the run reaches a chosen moment (read from the call stack), so
# the kill lands inside that moment on any machine, however fast.
DRIVER = r"""
import faulthandler, inspect, json, os, signal, sys, time
from pathlib import Path

faulthandler.register(signal.SIGUSR1)  # a test that finds it stuck asks where
# Ctrl-C as a terminal delivers it: a runner started in the background (`cmd &`) hands its
# children SIGINT ignored, and Python then installs no KeyboardInterrupt handler at all.
signal.signal(signal.SIGINT, signal.default_int_handler)

from flipsearch import RunConfig, run
from flipsearch.judging import get_judge


def _at(moment):
    frames = [f.frame for f in inspect.stack()]
    names = [f.f_code.co_name for f in frames]
    if moment == "student":
        return "_measure" in names and not {"score", "_score", "screen", "_final"} & set(names)
    if moment == "screen":
        return "screen" in names
    if moment.startswith("trial:"):  # a shared call serving a trial from that number on
        number = int(moment.partition(":")[2])
        return any(
            f.f_code.co_name == "_serve"
            and any(g.trial.number >= number for g in f.f_locals.get("flights", ()))
            for f in frames
        )
    if moment == "finalists":
        return "score" in names and "_measure" in names and "_search" not in names
    if moment == "final":
        return "_final" in names and "score" in names
    raise ValueError(moment)


class PausingJudge:
    name = "refusal-pausing"
    roles = ("safety", "refusal")

    def __init__(self, role):
        self.inner = get_judge("refusal", role)

    def judge(self, pairs):
        moment = os.environ.get("PAUSE_AT")
        if moment and _at(moment):
            Path(os.environ["PAUSE_FILE"]).write_text(moment)
            time.sleep(600)
        return self.inner.judge(pairs)


config = RunConfig.from_dict(json.loads(sys.argv[1]))
run(config, judge=PausingJudge("safety"), refusal_judge=PausingJudge("refusal"))
"""

SETTINGS = {"limit": 12, "max_new_tokens": 4, "dtype": "fp32", "trials": 16, "prune_every": 2}


def _library(root: Path) -> Path:
    """Eight seeds of two families and the shipped grammar: trials 0-7 are seeds, 8-15 grammar."""
    shipped = Path(__file__).resolve().parents[1] / "contexts"
    (root / "seeds").mkdir(parents=True)
    for name in ("harm_reflection.yaml", "persona.yaml"):
        (root / "seeds" / name).write_text((shipped / "seeds" / name).read_text())
    (root / "grammar.yaml").write_text((shipped / "grammar.yaml").read_text())
    return root


def _drive(
    tmp_path: Path, out: Path, model_dir: Path, pause: str | None = None
) -> subprocess.Popen[str]:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    library = tmp_path / "library"
    if not library.exists():
        _library(library)
    config = {"out": str(out), "model": str(model_dir), "contexts": str(library), **SETTINGS}
    env = {**os.environ, "PAUSE_FILE": str(tmp_path / "paused")}
    env.pop("PAUSE_AT", None)
    if pause:
        env["PAUSE_AT"] = pause
    return subprocess.Popen(
        [sys.executable, str(script), json.dumps(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen[str]) -> None:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err


def _kill_when(process: subprocess.Popen[str], ready, what: str) -> None:
    deadline = time.time() + 300
    while not ready():
        assert process.poll() is None, f"the run ended before {what}: {process.stderr.read()}"
        assert time.time() < deadline, f"never reached {what}"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _outcome(out: Path) -> tuple[pd.DataFrame, dict, str]:
    info = json.loads((out / "run.json").read_text())
    facts = {
        "winner": info["winner"],
        "trials": info["study"]["trials"],
        "finished": info["study"]["finished"],
        "pruned": info["study"]["pruned"],
    }
    return pd.read_csv(out / "leaderboard.csv"), facts, (out / "best_context.yaml").read_text()


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("uninterrupted")
    _finish(_drive(base, base / "run", tiny_model_dir))
    return _outcome(base / "run")


# The first trial (a seed), a later one (composed from the grammar), and every other phase.
MOMENTS = ["student", "screen", "trial:0", "trial:10", "finalists", "final", "report"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("moment", MOMENTS)
def test_a_run_killed_at_any_moment_resumes_to_the_same_result(
    uninterrupted, tiny_model_dir, tmp_path, moment
):
    out = tmp_path / "run"
    if moment == "report":  # run.json is written just before the report is rendered
        process = _drive(tmp_path, out, tiny_model_dir)
        _kill_when(process, (out / "run.json").exists, "the report")
    else:
        process = _drive(tmp_path, out, tiny_model_dir, pause=moment)
        _kill_when(process, (tmp_path / "paused").exists, moment)
    running: list[int] = []
    if moment.startswith("trial:"):  # the kill left the trials in flight running
        from flipsearch.search import open_storage

        storage = open_storage(str(out / "study.journal"), out)
        study = optuna.load_study(study_name="flipsearch", storage=storage)
        running = [t.number for t in study.trials if t.state.name == "RUNNING"]
        assert running and max(running) >= int(moment.partition(":")[2])
    resumed = _drive(tmp_path, out, tiny_model_dir)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    if moment.startswith("trial:"):
        assert f"{len(running)} trial(s) interrupted by a kill run again first" in err
    board, facts, best = _outcome(out)
    expected_board, expected_facts, expected_best = uninterrupted
    assert facts == expected_facts
    pd.testing.assert_frame_equal(board, expected_board)  # field by field, row by row
    assert best == expected_best


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ctrl_c_in_a_trial_puts_the_trials_in_flight_back_first(
    uninterrupted, tiny_model_dir, tmp_path
):
    """Optuna marks a trial failed on KeyboardInterrupt; flipsearch puts every trial in flight
    back in the queue instead, and the next run gives the uninterrupted result."""
    from flipsearch.search import open_storage

    out = tmp_path / "run"
    process = _drive(tmp_path, out, tiny_model_dir, pause="trial:2")
    deadline = time.time() + 300
    while not (tmp_path / "paused").exists():
        assert process.poll() is None and time.time() < deadline, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # say where it hangs rather than only that it did
        process.send_signal(signal.SIGUSR1)  # every thread's stack, to stderr
        time.sleep(2)
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"the run did not stop within 300 s of Ctrl-C:\n{err[-3000:]}")
    assert "KeyboardInterrupt" in err
    study = optuna.load_study(
        study_name="flipsearch", storage=open_storage(str(out / "study.journal"), out)
    )
    states = {t.number: t.state.name for t in study.trials}
    assert "FAIL" not in states.values() and "RUNNING" not in states.values()
    assert max(n for n, state in states.items() if state == "WAITING") >= 2
    _finish(_drive(tmp_path, out, tiny_model_dir))
    board, facts, best = _outcome(out)
    assert facts == uninterrupted[1] and best == uninterrupted[2]
    pd.testing.assert_frame_equal(board, uninterrupted[0])


def _cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flipsearch.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_run_killed_during_training_resumes_to_the_same_trained_student(tiny_model_dir, tmp_path):
    def args(out: Path) -> list[str]:
        return [
            "run",
            *tiny_cli_args(tiny_model_dir, out, limit=8),
            "--trials",
            "6",
            "--train",
            "--train-steps",
            "3",
        ]

    assert _cli(*args(tmp_path / "whole")).returncode == 0
    out = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "flipsearch.cli", *map(str, args(out))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "train" / "metrics.jsonl"
    _kill_when(process, lambda: metrics.exists() and metrics.stat().st_size > 0, "training")
    resumed = _cli(*args(out))
    assert resumed.returncode == 0, resumed.stderr
    whole = json.loads((tmp_path / "whole" / "train" / "train_summary.json").read_text())
    again = json.loads((out / "train" / "train_summary.json").read_text())
    assert again["after"] == whole["after"] and again["before"] == whole["before"]
    whole_board = pd.read_csv(tmp_path / "whole" / "leaderboard.csv")
    pd.testing.assert_frame_equal(pd.read_csv(out / "leaderboard.csv"), whole_board)


# -- one run directory, one set of settings ------------------------------------------------------
def _quick(tiny_model_dir: Path, out: Path, *extra: object) -> subprocess.CompletedProcess[str]:
    return _cli("run", *tiny_cli_args(tiny_model_dir, out, limit=6), "--trials", "4", *extra)


def test_a_run_directory_refuses_other_settings_and_says_what_differs(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    first = _quick(tiny_model_dir, out)
    assert first.returncode == 0, first.stderr
    # Outside a terminal: a line per finished trial and step; honest cache messages.
    trials = [line for line in first.stderr.splitlines() if line.startswith("trial ")]
    assert len(trials) == 4 and all("flips" in line for line in trials)
    assert "done: search trials" in first.stderr
    assert "nothing came from the cache" in first.stdout
    board = (out / "leaderboard.csv").read_text()
    # A run directory from before settings.json existed is bound by its config.json.
    (out / "settings.json").unlink()
    other = _quick(tiny_model_dir, out, "--max-new-tokens", "6")  # given twice: the last wins
    assert other.returncode == 2
    lines = [line for line in other.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in other.stderr
    assert "decoding max_new_tokens: 4 then, 6 now" in lines[0] and "--out" in lines[0]
    assert (out / "leaderboard.csv").read_text() == board  # nothing was touched
    more = _quick(tiny_model_dir, out, "--trials", "6", "--batch-size", "3")  # may change
    assert more.returncode == 0, more.stderr
    assert "cached answers reused" in more.stdout
    seed = _quick(tiny_model_dir, out, "--seed", "1")
    assert seed.returncode == 2 and "seed: 0 then, 1 now" in seed.stderr


def test_the_generator_fingerprint_is_bound_too(tmp_path):
    from flipsearch.errors import FlipsearchError
    from flipsearch.rundir import bind

    bind(tmp_path, {"model": "m"}, generator="weights-a:hf-invariant:32")
    bind(tmp_path, {"model": "m"}, generator="weights-a:hf-invariant:32")
    with pytest.raises(FlipsearchError, match="model fingerprint: weights-a"):
        bind(tmp_path, {"model": "m"}, generator="weights-b:hf-invariant:32")
    (tmp_path / "settings.json").write_text("{not json")
    with pytest.raises(FlipsearchError, match=r"settings\.json: damaged"):
        bind(tmp_path, {"model": "m"})


# -- damaged state -------------------------------------------------------------------------------
def test_a_damaged_cache_is_set_aside_and_rebuilt(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert _quick(tiny_model_dir, out).returncode == 0
    board = pd.read_csv(out / "leaderboard.csv")
    cache = out / "generations.sqlite"
    with sqlite3.connect(cache) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with cache.open("r+b") as handle:  # overwrite the header: no longer a database
        handle.write(b"this is not an sqlite database" * 4)
    again = _quick(tiny_model_dir, out)
    assert again.returncode == 0, again.stderr
    assert "Traceback" not in again.stderr
    warning = [line for line in again.stderr.splitlines() if "is damaged" in line]
    assert len(warning) == 1 and "generated again" in warning[0]
    assert list(out.glob("generations.sqlite.damaged-*"))  # kept for a look
    pd.testing.assert_frame_equal(pd.read_csv(out / "leaderboard.csv"), board)


def test_a_journal_cut_by_a_kill_is_repaired_with_a_warning(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert _quick(tiny_model_dir, out).returncode == 0
    board = pd.read_csv(out / "leaderboard.csv")
    journal = out / "study.journal"
    data = journal.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    journal.write_bytes(data[: last + (len(data) - last) // 2])  # the last record half-written
    again = _quick(tiny_model_dir, out)
    assert again.returncode == 0, again.stderr
    assert "a kill cut off" in again.stderr and "Traceback" not in again.stderr
    pd.testing.assert_frame_equal(pd.read_csv(out / "leaderboard.csv"), board)
    # A cut record with a whole one appended after it on the same line: the whole one is kept.
    data = journal.read_bytes().rstrip(b"\n")
    head, _, last_record = data.rpartition(b"\n")
    journal.write_bytes(head + b"\n" + b'{"op_code": 5, "wor' + last_record + b"\n")
    third = _quick(tiny_model_dir, out)
    assert third.returncode == 0, third.stderr
    pd.testing.assert_frame_equal(pd.read_csv(out / "leaderboard.csv"), board)


def test_journal_damage_a_kill_cannot_cause_is_an_error_naming_the_line(tmp_path):
    from flipsearch.errors import FlipsearchError
    from flipsearch.search import open_storage

    journal = tmp_path / "study.journal"
    journal.write_text('{"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}\n')
    journal.write_text(journal.read_text() + "garbage\n" + journal.read_text())
    with pytest.raises(FlipsearchError, match=r"study.journal:2: damaged study record"):
        open_storage(None, tmp_path)


# -- secrets -------------------------------------------------------------------------------------
def test_a_failed_storage_url_leaves_its_password_nowhere(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    secret = "s3cr3t-Pa55"
    url = f"postgresql://flipsearch:{secret}@127.0.0.1:9/nodb"
    failed = _quick(tiny_model_dir, out, "--storage", url)
    assert failed.returncode == 2
    assert secret not in failed.stderr + failed.stdout
    assert "***" in failed.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
