"""The report escapes every piece of model and user text (generations are untrusted)."""

import json
import re

import pandas as pd

from flipsearch import render_report

HOSTILE = ["<script>alert(1)</script>", "</table><h1>owned</h1>", '<img src=x onerror="alert(2)">']


def _write_run(run_dir):
    run_dir.mkdir()
    rows = []
    for i, text in enumerate(HOSTILE):
        common = {
            "split": "search",
            "prompt_id": f"p{i}",
            "kind": "harmful",
            "category": "cat",
            "sample": 0,
            "prompt": text,
            "finish_reason": "stop",
            "score": 1.0,
            "categories": [],
            "reason": "",
        }
        rows.append(
            {
                **common,
                "context": None,
                "response": text,
                "unsafe": True,
                "refusal": False,
                "invalid": False,
            }
        )
        rows.append(
            {
                **common,
                "context": "ctx<script>",
                "response": "I can't " + text,
                "unsafe": False,
                "refusal": True,
                "invalid": False,
            }
        )
    (run_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(
        [
            {
                "rank": 1,
                "context": "ctx<script>",
                "family": "<b>fam</b>",
                "placement": "system",
                "flip_rate": 1.0,
                "flip_rate_low": 0.4,
                "flip_rate_high": 1.0,
                "flip_rate_count": 3,
                "flip_rate_n": 3,
                "absolute_flip_rate": 1.0,
                "absolute_flip_rate_low": 0.4,
                "absolute_flip_rate_high": 1.0,
                "absolute_flip_rate_count": 3,
                "absolute_flip_rate_n": 3,
                "unflip_rate": 0.0,
                "unflip_rate_low": 0.0,
                "unflip_rate_high": 1.0,
                "unflip_rate_count": 0,
                "unflip_rate_n": 0,
                "benign_refusal": 0.0,
                "benign_refusal_low": 0.0,
                "benign_refusal_high": 1.0,
                "benign_refusal_count": 0,
                "benign_refusal_n": 0,
                "invalid": 0,
                "feasible": True,
                "p_vs_leader": float("nan"),
            }
        ]
    ).to_csv(run_dir / "leaderboard.csv", index=False)
    (run_dir / "best_context.yaml").write_text(
        "id: ctx<script>\nplacement: system\ntext: '<script>x</script>'\n"
    )
    info = {
        "model": "<script>m</script>",
        "winner": "ctx<script>",
        "contexts": 1,
        "prompt_counts": {"harmful_search": 3, "harmful_holdout": 0, "benign": 0},
        "generated": {"student": 3, "teacher": 3},
        "cached_before": 0,
        "seconds": 1,
        "finished": "now",
        "student_prompt_example": HOSTILE[0],
        "teacher_prompt_example": HOSTILE[1],
        "config": {
            "judge": "refusal",
            "out": "x",
            "max_benign_refusal": 0.5,
            "temperature": 0.0,
            "max_new_tokens": 8,
        },
        "student_unsafe_rate_search": {"successes": 3, "n": 3},
    }
    (run_dir / "run.json").write_text(json.dumps(info))
    token_kl = {
        "context": "ctx<script>",
        "divergence": "KL",
        "mean_kl_by_position": [0.5, 0.1],
        "n_by_position": [1, 1],
        "examples": [
            {
                "prompt_id": "p0",
                "prompt": HOSTILE[2],
                "flip": 1.0,
                "tokens": [HOSTILE[0], HOSTILE[1]],
                "kl": [0.5, 0.1],
            }
        ],
    }
    (run_dir / "token_kl.json").write_text(json.dumps(token_kl))


def test_no_model_text_survives_as_markup(tmp_path):
    run_dir = tmp_path / "run"
    _write_run(run_dir)
    html = render_report(run_dir).read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # The only script element is the report's own sorting code; no injected tags survive.
    assert len(re.findall(r"<script", html, flags=re.I)) == 1
    assert "<h1>owned</h1>" not in html and "</table><h1>" not in html
    assert "<img src=x" not in html and 'onerror="alert' not in html
    assert "<b>fam</b>" not in html
    assert 'id="tokens"' in html  # the token heat view rendered the hostile tokens, escaped


def test_report_is_self_contained(tmp_path):
    run_dir = tmp_path / "run"
    _write_run(run_dir)
    html = render_report(run_dir).read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert "data:image/png;base64," in html


def _result(split, pid, category, context, sample, unsafe, invalid=False):
    return {
        "split": split,
        "prompt_id": pid,
        "kind": "harmful",
        "category": category,
        "sample": sample,
        "context": context,
        "unsafe": None if invalid else unsafe,
        "invalid": invalid,
    }


def test_category_rates_use_the_per_prompt_estimator_and_keep_splits_apart():
    from flipsearch.report import category_rates

    rows = [
        # search, "a": student unsafe on 2 of 2 samples, teacher safe on 1 of 2 -> 0.5 flips
        _result("search", "p1", "a", None, 0, True),
        _result("search", "p1", "a", None, 1, True),
        _result("search", "p1", "a", "w", 0, False),
        _result("search", "p1", "a", "w", 1, True),
        # search, "a": student unsafe 1 of 2; teacher sample 0 undecided (not safe) -> 0.25
        _result("search", "p2", "a", None, 0, True),
        _result("search", "p2", "a", None, 1, False),
        _result("search", "p2", "a", "w", 0, False, invalid=True),
        _result("search", "p2", "a", "w", 1, False),
        # holdout, "a": flipped on both samples
        _result("holdout", "p3", "a", None, 0, True),
        _result("holdout", "p3", "a", None, 1, True),
        _result("holdout", "p3", "a", "w", 0, False),
        _result("holdout", "p3", "a", "w", 1, False),
    ]
    rates = {
        (r["split"], r["category"]): r["rate"] for r in category_rates(pd.DataFrame(rows), "w")
    }
    search = rates[("search", "a")]
    assert (search.successes, search.n) == (0.75, 1.5)
    holdout = rates[("holdout", "a")]
    assert (holdout.successes, holdout.n) == (1.0, 1.0)
