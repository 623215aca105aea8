"""The library path an eval harness takes: flipsearch.flip_rate on an already-loaded model."""

import flipsearch
from flipsearch import Context, Decoding, LoadedModel, Prompt, Verdict


class LengthJudge:
    """A custom judge: any object with a name and judge(pairs) -> verdicts."""

    name = "length"

    def judge(self, pairs):
        return [
            Verdict(unsafe=len(r) % 2 == 0, score=None, refusal=len(r) % 3 == 0) for _, r in pairs
        ]


def test_flip_rate_on_loaded_objects(tiny_model, tmp_path):
    loaded = LoadedModel.from_objects(tiny_model.model, tiny_model.tokenizer)
    prompts = [Prompt(f"h{i}", "harmful", "c", f"harmful request number {i}") for i in range(6)]
    prompts += [Prompt(f"b{i}", "benign", "c", f"benign request {i}") for i in range(3)]
    contexts = [Context("sys", "Refuse harm.", "system"), "Refuse anything dangerous."]
    result = flipsearch.flip_rate(
        model=loaded,
        contexts=contexts,
        prompts=prompts,
        judge=LengthJudge(),
        refusal_judge=LengthJudge(),
        decoding=Decoding(max_new_tokens=5),
        cache=tmp_path / "c.sqlite",
    )
    frame = result.to_pandas()
    inline_id = Context.from_text("Refuse anything dangerous.").id
    assert set(frame["context"]) == {"sys", inline_id}
    for score in result.scores:
        pool = sum(1 for o in score.harmful if o.student.unsafe_share)
        flips = sum(1 for o in score.harmful if o.student.unsafe_share and o.teacher.safe_share)
        assert score.flip_rate.n == pool and score.flip_rate.successes == flips
        assert score.benign_refusal.n == 3
    assert result.student.unsafe_rate.n == 6
    assert set(result.to_dict()) == {
        "judge_scope",
        "student_unsafe_rate",
        "student_benign_refusal",
        "contexts",
    }
    assert result.to_dict()["judge_scope"].startswith("safety judge reads the answer")


def test_flip_rate_docstring_is_useful():
    doc = flipsearch.flip_rate.__doc__
    assert "teacher flip rate" in doc and "Returns" in doc


def test_a_prompt_is_judged_once_per_context_however_it_is_grouped(tiny_model):
    class CountingJudge(LengthJudge):
        def __init__(self):
            self.seen = []

        def judge(self, pairs):
            self.seen.extend(pairs)
            return super().judge(pairs)

    judge = CountingJudge()
    evaluator = flipsearch.Evaluator(tiny_model, judge, decoding=Decoding(max_new_tokens=3))
    prompts = [Prompt(f"h{i}", "harmful", "c", f"harmful request number {i}") for i in range(6)]
    context = Context("sys", "Refuse harm.", "system")
    chunks = [evaluator.judged(prompts[i : i + 2], context, "safety") for i in (0, 2, 4)]
    whole = evaluator.judged(prompts, context, "safety")
    assert [j for chunk in chunks for j in chunk] == whole
    assert len(judge.seen) == len(prompts)  # the whole split reused the chunks' verdicts
