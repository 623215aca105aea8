"""Every script in examples/ runs, on the tiny model, and prints what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script, model_dir, tmp_path, *extra):
    """Run an example on the tiny model with short answers; returns what it printed."""
    argv = [sys.executable, str(EXAMPLES / script), "--model", str(model_dir)]
    argv += ["--max-new-tokens", "4", *map(str, extra)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_score_contexts(tiny_model_dir, tmp_path):
    out = _run("score_contexts.py", tiny_model_dir, tmp_path, "--limit", 6)
    assert "student unsafe rate" in out and "refusal-suffix-apology" in out


def test_custom_judge(tiny_model_dir, tmp_path):
    out = _run("custom_judge.py", tiny_model_dir, tmp_path, "--limit", 6)
    assert "flip rate:" in out and "invalid verdicts:" in out


def test_search_with_storage(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    out = _run("search_with_storage.py", tiny_model_dir, tmp_path, "--out", run, "--trials", 6)
    assert (run / "study.db").is_file()
    assert "study 'example'" in out and "report:" in out


def test_inspect_eval(tiny_model_dir, tmp_path):
    logs = tmp_path / "logs"
    out = _run("inspect_eval.py", tiny_model_dir, tmp_path, "--limit", 4, "--log-dir", logs)
    assert "without context: unsafe" in out and "flip rate:" in out
    assert len(list(logs.glob("*.eval"))) == 2
