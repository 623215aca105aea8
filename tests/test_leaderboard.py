"""Typed leaderboard rows: stored and read back unchanged, one ranking rule, the winner."""

from __future__ import annotations

import json

from flipsearch import Context, Prompt, Verdict
from flipsearch.backends import Generation
from flipsearch.fliprate import ContextScore, Judged, PairedOutcome
from flipsearch.leaderboard import Row, pick_winner, rank, to_frame

PROMPTS = [Prompt(f"h{i}", "harmful", "c", f"request {i}") for i in range(4)]
BENIGN = [Prompt(f"b{i}", "benign", "c", f"question {i}") for i in range(4)]


def _judged(prompt: Prompt, unsafe: bool, refusal: bool = False) -> Judged:
    verdict = Verdict(unsafe=unsafe, score=float(unsafe), refusal=refusal)
    return Judged(prompt, prompt.text, [Generation("x", (1,), "stop")], [verdict])


def score(name: str, flips: int, refusals: int, split: str = "search") -> ContextScore:
    """A context that flips the first ``flips`` prompts and refuses ``refusals`` benign ones."""
    harmful = [
        PairedOutcome(_judged(p, True), _judged(p, i >= flips)) for i, p in enumerate(PROMPTS)
    ]
    benign = [_judged(p, False, i < refusals) for i, p in enumerate(BENIGN)]
    return ContextScore(Context(name, f"Text of {name}.", "system"), split, harmful, benign)


def test_a_row_survives_json_storage():
    row = Row.of_score(score("a", 3, 1))
    stored = json.loads(json.dumps(row.to_dict()))
    again = Row.from_dict(stored)
    assert again.to_dict() == row.to_dict()
    assert again["flip_rate"] == 0.75 and again["benign_refusal_n"] == 4
    assert again.context == row.context and again.outcomes == row.outcomes


def test_a_pruned_row_keeps_its_partial_counts():
    row = Row.pruned(Context("p", "P.", "system"), {"h0": 0.0, "h1": 1.0}, 2.0)
    again = Row.from_dict(json.loads(json.dumps(row.to_dict())))
    assert again.state == "pruned" and (again["flip_rate_count"], again["flip_rate_n"]) == (1, 2)
    assert again.benign_refusal is None and again.feasible(0.0)


def test_ranking_puts_complete_feasible_rows_first():
    strong_but_refusing = Row.of_score(score("refuser", 4, 4))
    good = Row.of_score(score("good", 3, 0))
    weaker = Row.of_score(score("weaker", 2, 0))
    pruned = Row.pruned(Context("p", "P.", "system"), {"h0": 1.0}, 1.0)
    ranked = rank([pruned, weaker, strong_but_refusing, good], max_benign_refusal=0.5)
    assert [r.context.id for r in ranked] == ["good", "weaker", "refuser", "p"]
    frame = to_frame(ranked, [], 0.5)
    assert list(frame["context"]) == ["good", "weaker", "refuser", "p"]
    assert list(frame["feasible"]) == [True, True, False, True]


def test_the_winner_is_chosen_on_the_held_out_split():
    search = [score("a", 4, 0), score("b", 3, 0)]
    holdout = [score("a", 1, 0, "holdout"), score("b", 3, 0, "holdout")]
    assert pick_winner(search, holdout, 0.5).context.id == "b"
    assert pick_winner(search, [], 0.5).context.id == "a"


def test_an_infeasible_context_never_wins():
    search = [score("refuser", 4, 4), score("also", 3, 3)]
    holdout = [score("refuser", 4, 4, "holdout"), score("also", 3, 3, "holdout")]
    assert pick_winner(search, holdout, 0.5) is None
    assert pick_winner(search, [], 0.5) is None  # without a selection split too
    # Feasible on the search's benign prompts but not on the selection split's: it cannot win;
    # the selection split decides.
    search = [score("a", 4, 0), score("b", 2, 0)]
    holdout = [score("a", 4, 4, "holdout"), score("b", 2, 1, "holdout")]
    assert pick_winner(search, holdout, 0.5).context.id == "b"
    # A selection split without benign prompts leaves feasibility to the search's.
    no_benign = [
        ContextScore(s.context, "holdout", s.harmful, [])
        for s in (score("a", 4, 0), score("b", 2, 0))
    ]
    assert pick_winner(search, no_benign, 0.5).context.id == "a"


def test_not_needed_rows_are_not_shown_feasible():
    measured = Row.of_score(score("a", 4, 0))
    skipped = Row.of_score(
        ContextScore(Context("s", "S.", "system"), "search", score("s", 1, 0).harmful, []),
        benign="not needed",
    )
    frame = to_frame([measured, skipped], [], 0.5)
    assert list(frame["feasible"]) == [True, None]


def test_the_winner_carries_its_final_split_rates():
    search = [score("a", 4, 0), score("b", 3, 0)]
    holdout = [score("a", 4, 0, "holdout"), score("b", 3, 0, "holdout")]
    final = score("a", 2, 1, "final")
    frame = to_frame([Row.of_score(s) for s in search], holdout, 0.5, final)
    winner = frame[frame["context"] == "a"].iloc[0]
    assert (winner["final_flip_rate"], winner["final_flip_rate_n"]) == (0.5, 4)
    assert winner["final_benign_refusal"] == 0.25
    assert winner["holdout_benign_refusal"] == 0.0
    assert frame[frame["context"] == "b"]["final_flip_rate"].isna().all()
