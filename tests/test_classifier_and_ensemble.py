import fractions

import pytest

from flipsearch import FlipsearchError, Verdict
from flipsearch._resources import data_path
from flipsearch.judging import get_judge
from flipsearch.judging.agreement import evaluate_judge, load_labelled, rogan_gladen
from flipsearch.judging.classifier import ClassifierJudge, train_classifier
from flipsearch.judging.ensemble import EnsembleJudge
from flipsearch.judging.refusal import RefusalJudge


def test_shipped_labelled_set():
    rows = load_labelled()
    assert len(rows) >= 300
    cases = {r.case for r in rows}
    assert {"refuse_then_comply", "comply_with_apology", "partial", "benign_answer"} <= cases
    assert all(r.unsafe is not None and r.refusal is not None for r in rows)


def test_classifier_trains_saves_without_pickle_and_generalises(tmp_path):
    rows = load_labelled()
    train, test = rows[::2], rows[1::2]
    path = train_classifier(train, "unsafe", tmp_path / "clf")
    assert (path / "pipeline.skops").is_file()
    assert not list(path.glob("*.pkl"))
    judge = ClassifierJudge(path)
    metrics = evaluate_judge(judge, test, "unsafe")
    # Against the opening-only marker judge (the old default); the whole-answer refusal judge
    # is now as good as the classifier at deciding, which adds ranking (AUROC) to it.
    opening = RefusalJudge(data_path("judges") / "refusal-opening.yaml")
    baseline = evaluate_judge(opening, test, "unsafe")
    assert metrics["f1"] > baseline["f1"] and metrics["auroc"] > 0.8
    assert metrics["f1"] >= evaluate_judge(RefusalJudge(), test, "unsafe")["f1"] - 0.02


def test_classifier_refuses_unexpected_types(tmp_path):
    import skops.io as sio

    path = tmp_path / "clf"
    path.mkdir()
    sio.dump({"model": fractions.Fraction(1, 2)}, path / "pipeline.skops")
    (path / "meta.json").write_text('{"label": "unsafe"}')
    with pytest.raises(FlipsearchError, match="refuses to load unexpected types"):
        ClassifierJudge(path)


def test_classifier_roles(tmp_path):
    rows = load_labelled()
    unsafe = ClassifierJudge(train_classifier(rows, "unsafe", tmp_path / "u"))
    assert unsafe.roles == ("safety",)
    refusal = ClassifierJudge(train_classifier(rows, "refusal", tmp_path / "r"))
    [verdict] = refusal.judge([("p", "I can't help with that.")])
    assert verdict.refusal is True and verdict.unsafe is False
    with pytest.raises(FlipsearchError, match="cannot serve as the refusal judge"):
        get_judge(f"classifier:{tmp_path / 'u'}", "refusal")


class Fixed:
    def __init__(self, name, verdicts):
        self.name, self.verdicts = name, verdicts

    def judge(self, pairs):
        return self.verdicts[: len(pairs)]


def _v(unsafe, score=None):
    if unsafe is None:
        return Verdict.invalid_because("x")
    return Verdict(unsafe=unsafe, score=float(unsafe) if score is None else score)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("any", [True, True, False]),
        ("all", [False, False, False]),
        ("majority", [True, False, False]),
        ("mean", [True, False, False]),
    ],
)
def test_ensemble_modes(mode, expected):
    a = Fixed("a", [_v(True), _v(True), _v(False)])
    b = Fixed("b", [_v(True), _v(False), _v(None)])
    c = Fixed("c", [_v(False, 0.9), _v(False), _v(None)])
    verdicts = EnsembleJudge([a, b, c], mode).judge([("p", "r")] * 3)
    assert [v.unsafe for v in verdicts] == expected


def test_ensemble_is_invalid_only_when_every_member_is():
    a = Fixed("a", [_v(None)])
    b = Fixed("b", [_v(None)])
    [verdict] = EnsembleJudge([a, b], "any").judge([("p", "r")])
    assert verdict.invalid


def test_ensemble_by_name():
    judge = get_judge("ensemble:majority:refusal+refusal+classifier", "safety")
    assert judge.name == "ensemble:majority:refusal+refusal+classifier"
    with pytest.raises(FlipsearchError, match="unknown ensemble mode"):
        get_judge("ensemble:most:refusal+refusal")


def test_metrics_on_a_known_confusion():
    rows = load_labelled()[:40]
    metrics = evaluate_judge(RefusalJudge(), rows, "refusal")
    c = metrics["confusion"]
    assert c["tp"] + c["fp"] + c["fn"] + c["tn"] == metrics["n"] - metrics["invalid"]
    assert metrics["precision"] == pytest.approx(c["tp"] / (c["tp"] + c["fp"]))
    assert metrics["specificity"] == pytest.approx(c["tn"] / (c["tn"] + c["fp"]))


def test_rogan_gladen():
    assert rogan_gladen(0.5, 1.0, 1.0) == 0.5
    # A judge that flags 10% of safe answers and catches 80% of unsafe ones.
    assert rogan_gladen(0.1 + 0.7 * 0.5, 0.8, 0.9) == pytest.approx(0.5)
    assert rogan_gladen(0.0, 0.8, 0.9) == 0.0  # clipped
    with pytest.raises(FlipsearchError):
        rogan_gladen(0.5, 0.5, 0.5)


def test_labelled_file_errors(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text('{"prompt": "p", "response": "r", "unsafe": "maybe"}\n')
    with pytest.raises(FlipsearchError, match=r"l\.jsonl:1: 'unsafe' must be true/false"):
        load_labelled(path)
    path.write_text('{"prompt": "p", "response": "r"}\n')
    with pytest.raises(FlipsearchError, match="no 'unsafe' or 'refusal' label"):
        load_labelled(path)
    csv = tmp_path / "l.csv"
    csv.write_text("prompt,response,refusal,extra\np,r,1,kept\n")
    [row] = load_labelled(csv, "refusal")
    assert row.refusal is True and row.unsafe is None


def test_corrections_refuse_unmeasured_or_mismatched_metrics(tmp_path):
    import json

    from flipsearch.judging.agreement import read_judge_metrics

    with pytest.raises(FlipsearchError, match="not both measured"):
        rogan_gladen(0.5, float("nan"), 0.9)
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"label": "refusal", "sensitivity": 0.9, "specificity": 0.9}))
    with pytest.raises(FlipsearchError, match="measured for the 'refusal' label"):
        read_judge_metrics(metrics)
    metrics.write_text(
        json.dumps({"label": "unsafe", "sensitivity": float("nan"), "specificity": 1})
    )
    with pytest.raises(FlipsearchError, match="sensitivity was not measured"):
        read_judge_metrics(metrics)
    metrics.write_text(json.dumps({"label": "unsafe", "sensitivity": 0.8, "specificity": 0.9}))
    assert read_judge_metrics(metrics) == {"sensitivity": 0.8, "specificity": 0.9}


def test_corrected_flip_rate_interval_covers_both_sources_of_error():
    from flipsearch.judging.agreement import corrected_flip_interval

    flips = [1.0] * 12 + [0.0] * 8  # observed flip rate 0.6
    point = 1 - rogan_gladen(1 - 0.6, 0.9, 0.85)
    fixed = corrected_flip_interval(flips, 0.9, 0.85)
    both = corrected_flip_interval(flips, 0.9, 0.85, positives=40, negatives=40)
    assert fixed[0] < point < fixed[1] and both[0] <= point <= both[1]
    assert both[1] - both[0] > fixed[1] - fixed[0]  # a small labelled set widens it
    assert corrected_flip_interval(flips, 0.9, 0.85, 40, 40) == both  # seeded
    perfect = corrected_flip_interval(flips, 1.0, 1.0)  # the plain bootstrap of the rate
    assert 0.3 < perfect[0] < 0.6 < perfect[1] < 0.85
    assert corrected_flip_interval([], 0.9, 0.9) != corrected_flip_interval([], 0.9, 0.9)  # NaN


def test_judge_metrics_carry_the_labelled_set_size(tmp_path):
    import json

    from flipsearch.judging.agreement import read_judge_metrics

    path = tmp_path / "m.json"
    confusion = {"tp": 30, "fn": 5, "tn": 40, "fp": 3}
    path.write_text(
        json.dumps(
            {"label": "unsafe", "sensitivity": 0.86, "specificity": 0.93, "confusion": confusion}
        )
    )
    metrics = read_judge_metrics(path)
    assert metrics["positives"] == 35 and metrics["negatives"] == 43
    path.write_text(
        json.dumps(
            {"label": "unsafe", "sensitivity": 0.86, "specificity": 0.93, "confusion": {"tp": 1}}
        )
    )
    with pytest.raises(FlipsearchError, match="confusion"):
        read_judge_metrics(path)
