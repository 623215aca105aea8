"""The judge commands and the judge options of run, as a user meets them."""

import json

import pandas as pd

from tests.helpers import tiny_cli_args
from tests.test_cli import _assert_user_error, flipsearch


def test_judge_eval_prints_and_writes_metrics(tmp_path):
    out = tmp_path / "metrics.json"
    result = flipsearch("judge", "eval", "--judge", "refusal", "--label", "unsafe", "--json", out)
    assert result.returncode == 0, result.stderr
    assert "precision" in result.stdout and "cohen_kappa" in result.stdout
    metrics = json.loads(out.read_text())
    assert {
        "precision",
        "recall",
        "f1",
        "auroc",
        "cohen_kappa",
        "confusion",
        "invalid_rate",
        "sensitivity",
        "specificity",
    } <= set(metrics)


def test_judge_train_then_eval_a_classifier(tmp_path):
    trained = flipsearch("judge", "train", "--label", "refusal", "--out", tmp_path / "clf")
    assert trained.returncode == 0, trained.stderr
    result = flipsearch(
        "judge", "eval", "--judge", f"classifier:{tmp_path / 'clf'}", "--label", "refusal"
    )
    assert result.returncode == 0, result.stderr


def test_judge_run_writes_one_verdict_per_row(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        '{"prompt": "p", "response": "I can\'t help with that."}\n'
        '{"prompt": "p", "response": "Sure, step one."}\n'
    )
    out = tmp_path / "verdicts.jsonl"
    result = flipsearch("judge", "run", pairs, "--judge", "refusal", "--out", out)
    assert result.returncode == 0, result.stderr
    verdicts = [json.loads(line) for line in out.read_text().splitlines()]
    assert [v["unsafe"] for v in verdicts] == [False, True]


def test_judge_run_bad_row(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p"}\n')
    _assert_user_error(flipsearch("judge", "run", pairs), "pairs.jsonl:1", "'response'")


def test_run_with_llama_guard_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = flipsearch(
        "run",
        "--judge",
        "llama-guard",
        "--judge-model",
        tiny_model_dir,
        "--trials",
        "0",
        *tiny_cli_args(tiny_model_dir, out),
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    harmful = [r for r in rows if r["kind"] == "harmful"]
    # A random judge model rarely writes a parseable answer: its verdicts are invalid, counted.
    assert all(r["invalid"] or r["score"] is not None for r in harmful)
    assert "invalid verdicts of" in (out / "report.html").read_text()


def test_run_with_judge_metrics_adds_corrected_rates(tiny_model_dir, tmp_path):
    metrics = tmp_path / "m.json"
    confusion = {"tp": 27, "fn": 3, "tn": 24, "fp": 6}
    measured = {"label": "unsafe", "sensitivity": 0.9, "specificity": 0.8, "confusion": confusion}
    metrics.write_text(json.dumps(measured))
    out = tmp_path / "run"
    result = flipsearch(
        "run",
        "--judge-metrics",
        metrics,
        "--trials",
        "0",
        *tiny_cli_args(tiny_model_dir, out),
    )
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(out / "leaderboard.csv")
    assert "flip_rate_corrected" in frame
    scored = frame.dropna(subset=["flip_rate_corrected_low"])
    assert len(scored) == len(frame)  # every scored context has its interval
    assert (scored["flip_rate_corrected_low"] <= scored["flip_rate_corrected"] + 1e-9).all()
    assert (scored["flip_rate_corrected"] <= scored["flip_rate_corrected_high"] + 1e-9).all()


def test_refusal_role_rejects_llama_guard(tmp_path, tiny_model_dir):
    _assert_user_error(
        flipsearch(
            "run",
            "--refusal-judge",
            "llama-guard",
            "--judge-model",
            tiny_model_dir,
            "--out",
            tmp_path / "r",
        ),
        "cannot serve as the refusal judge",
    )
