"""The command line as a user meets it: subprocesses, exit codes, files."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from tests.helpers import tiny_cli_args


def flipsearch(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "flipsearch.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    # Outside a terminal, work that started announces itself ("loading model X ..."); the
    # mistake itself is one line.
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    lines = [line for line in lines if not line.endswith(" ...")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text('{"prompt": "ok", "kind": "harmful"}\n{"prompt": oops}\n')
    _assert_user_error(
        flipsearch("run", "--prompts", prompts, "--out", tmp_path / "r"),
        "bad.jsonl:2",
        "malformed JSON",
    )


def test_empty_prompt_file(tmp_path):
    prompts = tmp_path / "empty.jsonl"
    prompts.write_text("")
    _assert_user_error(
        flipsearch("run", "--prompts", prompts, "--out", tmp_path / "r"), "empty.jsonl", "empty"
    )


def test_unknown_model(tmp_path):
    _assert_user_error(
        flipsearch("run", "--model", "no-such-model", "--out", tmp_path / "r"),
        "unknown model 'no-such-model'",
    )


def test_unknown_judge(tmp_path):
    _assert_user_error(
        flipsearch("run", "--judge", "oracle", "--out", tmp_path / "r"), "unknown judge 'oracle'"
    )


def test_backend_mistakes_are_one_line_errors(tiny_model_dir, tmp_path):
    import importlib.util

    args = ["score", "--context", "Refuse.", *tiny_cli_args(tiny_model_dir, tmp_path / "r")]
    # Each case its own run directory: one that got as far as the server is bound to openai.
    args_vllm = ["score", "--context", "Refuse.", *tiny_cli_args(tiny_model_dir, tmp_path / "v")]
    _assert_user_error(flipsearch(*args, "--backend", "tgi"), "unknown backend 'tgi'")
    _assert_user_error(flipsearch(*args, "--backend", "openai"), "needs a server: --base-url")
    _assert_user_error(
        flipsearch(*args, "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1"),
        "cannot reach the server at http://127.0.0.1:9/v1",
    )
    _assert_user_error(flipsearch(*args, "--vllm-arg", "seed"), "--vllm-arg 'seed': expected KEY")
    _assert_user_error(
        flipsearch(*args, "--vllm-arg", "max_model_len=2048"), "--vllm-arg is for --backend vllm"
    )
    if importlib.util.find_spec("vllm") is None:  # the main environment has no vLLM
        _assert_user_error(
            flipsearch(*args_vllm, "--backend", "vllm"), "needs vLLM in this environment"
        )


def test_context_file_without_text(tmp_path):
    context = tmp_path / "ctx.yaml"
    context.write_text("id: empty\nplacement: system\n")
    _assert_user_error(
        flipsearch("score", "--context", context, "--out", tmp_path / "r"), "ctx.yaml", "no text"
    )


def test_contexts_list_shows_the_library():
    result = flipsearch("contexts", "list")
    assert result.returncode == 0
    assert "refusal-exact-sentence" in result.stdout
    assert "contexts" in result.stdout.splitlines()[-1]


def test_help_documents_every_option():
    result = flipsearch("run", "--help")
    for option in (
        "--model",
        "--prompts",
        "--contexts",
        "--judge",
        "--samples",
        "--max-new-tokens",
        "--limit",
        "--seed",
        "--out",
    ):
        assert option in result.stdout


def test_run_writes_the_run_files_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    args = [
        "run",
        "--model",
        tiny_model_dir,
        "--limit",
        "6",
        "--max-new-tokens",
        "6",
        "--dtype",
        "fp32",
        "--out",
        out,
    ]
    first = flipsearch(*args)
    assert first.returncode == 0, first.stderr
    for name in (
        "leaderboard.csv",
        "results.jsonl",
        "best_context.yaml",
        "report.html",
        "run.json",
    ):
        assert (out / name).is_file(), name
    leaderboard = pd.read_csv(out / "leaderboard.csv")
    assert len(leaderboard) >= 15
    assert {
        "flip_rate",
        "flip_rate_low",
        "flip_rate_high",
        "absolute_flip_rate",
        "unflip_rate",
        "benign_refusal",
        "holdout_flip_rate",
        "p_vs_leader",
    } <= set(leaderboard)
    info = json.loads((out / "run.json").read_text())
    assert info["prompt_counts"] == {  # search / selection / final, harmful and benign
        "harmful_search": 3,
        "harmful_holdout": 2,
        "harmful_final": 1,
        "benign": 3,
        "benign_holdout": 2,
        "benign_final": 1,
    }
    assert info["generated"]["student"] == 12
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    splits = {"search", "holdout", "final", "benign", "benign_holdout", "benign_final"}
    assert {r["split"] for r in rows} == splits
    again = flipsearch(*args)
    assert again.returncode == 0, again.stderr
    assert "generated 0 student and 0 teacher prompts" in again.stdout
    assert json.loads((out / "run.json").read_text())["generated"] == {"student": 0, "teacher": 0}


def test_score_writes_run_files_for_given_contexts(tiny_model_dir, tmp_path):
    out = tmp_path / "score"
    result = flipsearch(
        "score",
        "--context",
        "Refuse anything harmful.",
        "--context",
        "Always help.",
        "--placement",
        "user_suffix",
        *tiny_cli_args(tiny_model_dir, out),
    )
    assert result.returncode == 0, result.stderr
    leaderboard = pd.read_csv(out / "leaderboard.csv")
    assert len(leaderboard) == 2
    assert set(leaderboard["placement"]) == {"user_suffix"}


@pytest.mark.parametrize("flag", ["--samples", "--max-new-tokens", "--limit"])
def test_out_of_range_numbers_are_rejected(flag, tmp_path):
    result = flipsearch("run", flag, "0", "--out", tmp_path / "r")
    assert result.returncode == 2 and "Traceback" not in result.stderr
