"""The inspect_ai integration, offline on a tiny model through the flipsearch model API."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
from inspect_ai import eval as inspect_eval
from inspect_ai.model import get_model

from flipsearch import RefusalJudge
from flipsearch.errors import FlipsearchError
from flipsearch.inspect_tasks import INVALID, flip_rate_from_logs, unsafe_rate


@pytest.fixture(scope="module")
def tiny_inspect_model(tiny_model):
    return get_model("flipsearch/tiny", loaded=tiny_model, batch_size=8)


def _eval(task, model, tmp_path):
    [log] = inspect_eval(task, model=model, log_dir=str(tmp_path / "logs"), display="none")
    assert log.status == "success", log.error
    return log


def test_unsafe_rate_task_scores_every_sample_with_the_judge(tiny_inspect_model, tmp_path):
    log = _eval(unsafe_rate(limit=6, max_new_tokens=6), tiny_inspect_model, tmp_path)
    judge = RefusalJudge()
    values = []
    for sample in log.samples:
        score = sample.scores["flipsearch_judge"]
        expected = judge.judge([(sample.input, sample.output.completion)])[0]
        assert score.value == float(expected.unsafe)
        values.append(score.value)
    metrics = log.results.scores[0].metrics
    assert metrics["decided"].value == 6 and metrics["invalid"].value == 0
    assert metrics["rate"].value == pytest.approx(sum(values) / 6)
    assert metrics["ci95_low"].value <= metrics["rate"].value <= metrics["ci95_high"].value


def test_context_goes_where_flipsearch_puts_it(tiny_inspect_model, tmp_path):
    text = "Decline anything harmful."
    system = _eval(
        unsafe_rate(context=text, limit=2, max_new_tokens=2), tiny_inspect_model, tmp_path
    )
    first = system.samples[0].messages
    assert first[0].role == "system" and first[0].text == text
    suffix = _eval(
        unsafe_rate(context=text, placement="user_suffix", limit=2, max_new_tokens=2),
        tiny_inspect_model,
        tmp_path,
    )
    user = next(m for m in suffix.samples[0].messages if m.role == "user")
    assert user.text == f"{suffix.samples[0].input}\n\n{text}"


def test_flip_rate_from_two_logs_pairs_samples_by_id(tiny_inspect_model, tmp_path):
    student = _eval(unsafe_rate(limit=8, max_new_tokens=6), tiny_inspect_model, tmp_path)
    teacher = _eval(
        unsafe_rate(context="Refuse harmful requests.", limit=8, max_new_tokens=6),
        tiny_inspect_model,
        tmp_path,
    )
    result = flip_rate_from_logs(student.location, teacher)  # a path or a log object
    before = {s.id: s.scores["flipsearch_judge"].value for s in student.samples}
    after = {s.id: s.scores["flipsearch_judge"].value for s in teacher.samples}
    decided = [i for i in before if before[i] != INVALID]  # an undecided teacher is kept
    pool = [i for i in decided if before[i] == 1.0]
    assert result.pool == len(pool) and result.paired == len(decided)
    assert result.flips == sum(after[i] == 0.0 for i in pool)  # INVALID is never a flip
    assert result.flip_rate.n == result.pool and 0 <= result.p_value <= 1
    assert result.to_pandas().loc[0, "flips"] == result.flips


def test_flip_rate_from_unrelated_logs_is_a_clear_error(tiny_inspect_model, tmp_path):
    harmful = _eval(unsafe_rate(limit=2, max_new_tokens=2), tiny_inspect_model, tmp_path)
    benign = _eval(
        unsafe_rate(kind="benign", limit=2, max_new_tokens=2), tiny_inspect_model, tmp_path
    )
    with pytest.raises(FlipsearchError, match="share no sample ids"):
        flip_rate_from_logs(harmful, benign)


def test_registered_with_inspect_through_the_entry_point():
    names = {ep.name: ep.value for ep in entry_points(group="inspect_ai")}
    assert names.get("flipsearch") == "flipsearch.inspect_tasks"
    from inspect_ai._util.registry import registry_lookup

    assert registry_lookup("task", "flipsearch/unsafe_rate") is not None
    assert registry_lookup("scorer", "flipsearch/flipsearch_judge") is not None
    assert registry_lookup("modelapi", "flipsearch/flipsearch") is not None


def test_epochs_and_undecided_verdicts_use_the_core_estimator():
    from flipsearch.inspect_tasks import paired_flip_rate

    student = {"a": [1.0, 1.0], "b": [1.0, 0.0], "c": [INVALID, INVALID], "d": [0.0]}
    teacher = {"a": [0.0, INVALID], "b": [0.0, 0.0], "c": [0.0, 0.0], "d": [INVALID]}
    result = paired_flip_rate(student, teacher)
    # a: 1 x 0.5 (the undecided epoch is not safe); b: 0.5 x 1; c leaves; d: an unflip.
    assert (result.flips, result.pool) == (1.0, 1.5)
    assert result.unflips == 1.0 and result.paired == 3 and result.invalid == 1
    assert result.teacher_invalid == 2
