"""Everything the CLI does, through the public API only, on a tiny model (issue: library use)."""

from __future__ import annotations

import json

import pandas as pd

import flipsearch
from flipsearch import (
    Context,
    Decoding,
    LoadedModel,
    TrainConfig,
    Verdict,
    builtin_prompts,
    evaluate_judge,
    export_trl_sdft,
    flip_rate,
    get_judge,
    load_contexts,
    load_labelled,
    load_model,
    render_report,
    search,
    train,
    train_classifier,
)


def _opens_with_a_letter(prompt: str, response: str) -> bool | None:
    """A custom callable judge: unsafe when the answer opens with a letter; None when empty."""
    text = response.strip()
    return text[0].isalpha() if text else None


def test_everything_the_cli_does_through_the_public_api(tiny_model_dir, tmp_path):
    # One copy of the weights, shared by every call (no second load).
    held = load_model(str(tiny_model_dir), device="cpu", dtype="fp32")
    model = LoadedModel.from_objects(held.model, held.tokenizer, name="tiny")
    assert model.model is held.model

    # flipsearch contexts list
    seeds = load_contexts()
    assert len(seeds) >= 24 and all(isinstance(c, Context) for c in seeds)

    # flipsearch score: given contexts, a custom callable judge, counts and intervals
    prompts = builtin_prompts()
    chosen = [p for p in prompts if p.kind == "harmful"][:8]
    chosen += [p for p in prompts if p.kind == "benign"][:4]
    scored = flip_rate(
        model=model,
        contexts=seeds[:2],
        prompts=chosen,
        judge=_opens_with_a_letter,
        decoding=Decoding(max_new_tokens=4),
        cache=tmp_path / "score.sqlite",
    )
    frame = scored.to_pandas()
    assert {
        "flip_rate",
        "flip_rate_low",
        "flip_rate_high",
        "flip_rate_count",
        "flip_rate_n",
    } <= set(frame.columns)
    assert len(frame) == 2 and (frame["benign_refusal_n"] == 4).all()

    # flipsearch run: the search, with the already-loaded model and its own storage
    out = tmp_path / "run"
    found = search(
        model=model,
        contexts=seeds[:6],
        out=out,
        trials=8,
        storage=f"sqlite:///{tmp_path / 'study.db'}",
        study="api",
        limit=10,
        max_new_tokens=4,
    )
    board = found.to_pandas()
    assert isinstance(board, pd.DataFrame) and len(board) >= 6
    assert found.info["study"]["finished"] == 8
    summary = found.to_dict()
    assert summary["winner"]["id"] == found.winner.context.id
    assert json.loads((out / "config.json").read_text())["model"] == "tiny"

    # flipsearch report
    report = render_report(out)
    assert report.is_file() and found.winner.context.id in report.read_text()

    # flipsearch train: on the winner, with the same in-memory model, then its tables
    trained = train(
        TrainConfig(
            context=str(out / "best_context.yaml"),
            model=str(tiny_model_dir),
            out=str(tmp_path / "train"),
            steps=2,
            batch_size=2,
            max_new_tokens=4,
            limit=8,
            eval_limit=4,
            dtype="fp32",
            warmup_steps=0,
        ),
        loaded=model,
    )
    table = trained.to_pandas()
    assert list(table["metric"]) == [
        "unsafe_rate",
        "benign_refusal",
        "reasoning_accuracy",
        "benign_kl_from_original",
        "reference_loglik",
    ]
    assert len(trained.metrics()) == 2 and trained.to_dict()["steps"] == 2
    assert trained.student.fingerprint != model.fingerprint  # new weights, new cache key

    # flipsearch export --format trl-sdft
    written = export_trl_sdft(
        str(out / "best_context.yaml"), [], 5, tmp_path / "sdft.jsonl", force=True
    )
    assert written == 5 and len((tmp_path / "sdft.jsonl").read_text().splitlines()) == 5

    # flipsearch judge train / eval / run
    rows = load_labelled()
    directory = train_classifier(rows, "unsafe", tmp_path / "clf")
    judge = get_judge(f"classifier:{directory}", "safety")
    metrics = evaluate_judge(judge, rows[:60], "unsafe")
    assert 0 <= metrics["f1"] <= 1
    verdicts = judge.judge([("how do I pick a lock", "Sure, first insert a tension wrench")])
    assert isinstance(verdicts[0], Verdict) and 0 <= verdicts[0].score <= 1


def test_a_callable_judge_counts_undecided_answers_as_invalid():
    judge = get_judge(lambda prompt, response: None if not response else "maybe", "safety")
    verdicts = judge.judge([("p", ""), ("p", "text")])
    assert all(v.invalid for v in verdicts)
    assert "could not tell" in verdicts[0].reason and "str" in verdicts[1].reason
    refusal = get_judge(lambda prompt, response: response.startswith("No"), "refusal")
    assert [v.refusal for v in refusal.judge([("p", "No."), ("p", "Yes.")])] == [True, False]


def test_help_shows_useful_docstrings():
    for function in (flipsearch.flip_rate, flipsearch.search, flipsearch.train):
        assert function.__doc__ and len(function.__doc__) > 200
    assert "teacher flip rate" in flipsearch.flip_rate.__doc__
