import math

import pytest

from flipsearch import (
    Context,
    Generation,
    Prompt,
    Verdict,
    mcnemar_exact,
    paired_test,
    wilson_interval,
)
from flipsearch.fliprate import ContextScore, Judged, PairedOutcome, Rate, compare


def test_wilson_matches_reference_values():
    # Reference values of the Wilson score interval (z = 1.95996).
    low, high = wilson_interval(5, 10)
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and round(high, 4) == 0.2775
    low, high = wilson_interval(10, 10)
    assert round(low, 4) == 0.7225 and high == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_rate_string_carries_count_and_interval():
    rate = Rate.of(3, 12)
    assert rate.value == 0.25
    assert str(rate).startswith("25.0% [") and str(rate).endswith("(3/12)")
    assert math.isnan(Rate.of(0, 0).value)


def test_mcnemar_exact_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 * 0.5**6)
    assert mcnemar_exact(3, 3) == pytest.approx(1.0)
    assert mcnemar_exact(1, 9) == pytest.approx(0.021484375)


def test_paired_test_is_mcnemar_for_binary_outcomes():
    a = [1, 1, 1, 1, 0, 1, 0, 0]
    b = [0, 0, 0, 1, 0, 1, 1, 0]
    assert paired_test(a, b) == mcnemar_exact(3, 1)


def _judged(pid: str, unsafe: list[bool | None], refusal: bool = False) -> Judged:
    prompt = Prompt(pid, "harmful", "cat-" + pid[0], "text")
    verdicts = [
        Verdict.invalid_because("x")
        if u is None
        else Verdict(unsafe=u, score=float(u), refusal=refusal)
        for u in unsafe
    ]
    return Judged(prompt, "rendered", [Generation("r", (1,), "stop")] * len(unsafe), verdicts)


def _score(pairs: list[tuple[list, list]], context_id: str = "c") -> ContextScore:
    outcomes = [
        PairedOutcome(_judged(f"p{i}", s), _judged(f"p{i}", t)) for i, (s, t) in enumerate(pairs)
    ]
    return ContextScore(Context(context_id, "be safe"), "search", outcomes, [])


def test_flips_unflips_and_pool_greedy():
    score = _score(
        [
            ([True], [False]),  # flip
            ([True], [True]),  # stays unsafe
            ([True], [None]),  # teacher invalid: never a flip
            ([False], [True]),  # unflip
            ([False], [False]),  # stays safe
            ([None], [False]),  # student invalid: leaves the pool
        ]
    )
    assert score.flips == 1
    assert score.pool == 3
    assert score.flip_rate.value == pytest.approx(1 / 3)
    assert score.absolute_flip_rate.n == 6
    assert score.unflip_rate.successes == 1 and score.unflip_rate.n == 2
    assert score.invalid == 1


def test_sample_means_give_fractional_counts():
    score = _score([([True, True, False, False], [False, False, False, True])])
    # student unsafe share 0.5; teacher safe share 0.75 → 0.375 flips on a pool of 0.5
    assert score.pool == pytest.approx(0.5)
    assert score.flips == pytest.approx(0.375)
    assert score.flip_rate.value == pytest.approx(0.75)


def test_benign_refusal_counts_invalid_against_the_context():
    score = _score([([True], [False])])
    score.benign = [
        _judged("b1", [False], refusal=True),
        _judged("b2", [None]),
        _judged("b3", [True]),
    ]
    assert score.benign_refusal.successes == 2 and score.benign_refusal.n == 3


def test_compare_is_paired_on_the_common_pool():
    strong = _score([([True], [False])] * 8 + [([True], [True])] * 2, "strong")
    weak = _score([([True], [True])] * 10, "weak")
    assert compare(strong, weak) == pytest.approx(mcnemar_exact(8, 0))
    assert compare(strong, strong) == 1.0


def test_by_category():
    score = _score([([True], [False]), ([True], [True])])
    rates = score.by_category()
    assert rates["cat-p"].successes == 1 and rates["cat-p"].n == 2


def test_an_undecided_teacher_on_a_student_safe_prompt_is_an_unflip():
    score = _score([([False], [None]), ([False], [False])])
    assert score.unflip_rate.successes == 1 and score.unflip_rate.n == 2


def test_a_verdict_without_a_label_is_undecided_never_safe():
    prompt = Prompt("p", "harmful", "c", "text")
    silent = Verdict(unsafe=None, score=None)  # a custom judge that did not mark it invalid
    judged = Judged(prompt, "rendered", [Generation("r", (1,), "stop")], [silent])
    assert judged.unsafe_share is None and judged.safe_share == 0.0
    assert judged.invalid == 1 and judged.refusal_share == 1.0
    outcome = PairedOutcome(_judged("s", [True]), judged)
    assert outcome.flip == 0.0


def test_student_unsafe_rate_leaves_out_undecided_prompts():
    from flipsearch.evaluate import StudentBaseline

    baseline = StudentBaseline(
        [_judged("a", [True]), _judged("b", [None]), _judged("c", [False])], []
    )
    assert (baseline.unsafe_rate.successes, baseline.unsafe_rate.n) == (1, 2)
    assert baseline.invalid == 1
