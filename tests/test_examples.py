"""Every script in examples/ runs, on the tiny model, and prints what it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script, *args, cwd):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_score_contexts(tiny_model_dir, tmp_path):
    out = _run(
        "score_contexts.py",
        "--model",
        tiny_model_dir,
        "--limit",
        6,
        "--max-new-tokens",
        4,
        cwd=tmp_path,
    )
    assert "student unsafe rate" in out and "refusal-suffix-apology" in out


def test_custom_judge(tiny_model_dir, tmp_path):
    out = _run(
        "custom_judge.py",
        "--model",
        tiny_model_dir,
        "--limit",
        6,
        "--max-new-tokens",
        4,
        cwd=tmp_path,
    )
    assert "flip rate:" in out and "invalid verdicts:" in out


def test_search_with_storage(tiny_model_dir, tmp_path):
    out = _run(
        "search_with_storage.py",
        "--model",
        tiny_model_dir,
        "--out",
        tmp_path / "run",
        "--trials",
        6,
        "--limit",
        8,
        "--max-new-tokens",
        4,
        cwd=tmp_path,
    )
    assert (tmp_path / "run" / "study.db").is_file()
    assert "study 'example'" in out and "report:" in out


def test_inspect_eval(tiny_model_dir, tmp_path):
    out = _run(
        "inspect_eval.py",
        "--model",
        tiny_model_dir,
        "--limit",
        4,
        "--max-new-tokens",
        4,
        "--log-dir",
        tmp_path / "logs",
        cwd=tmp_path,
    )
    assert "without context: unsafe" in out and "flip rate:" in out
