"""Before/after evaluation of a trained student: safety, over-refusal, reasoning, drift."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from flipsearch.backends._base import Decoding
from flipsearch.evaluate import Evaluator, StudentBaseline
from flipsearch.models import LoadedModel
from flipsearch.prompts import Prompt, split_harmful

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_WORD = re.compile(r"[a-z]+")


EVALUATION_SPLIT = "a seeded, category-stratified 30% of the harmful and of the benign prompts"


def split_for_training(prompts: Sequence[Prompt], seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Train on the search split, evaluate on the held-out split (the run's own split)."""
    return split_harmful(list(prompts), 0.3, seed) if len(prompts) > 1 else (list(prompts), [])


def answer_is_correct(response: str, answer: str) -> bool:
    """A numeric answer must be the first number of the response; a word answer one of its
    first eight words."""
    text = response.lower()
    try:
        expected = float(answer)
    except ValueError:
        return answer.lower() in _WORD.findall(text)[:8]
    found = _NUMBER.search(text.replace(",", ""))
    return found is not None and abs(float(found.group()) - expected) < 1e-9


def evaluate_student(
    loaded: LoadedModel,
    original: Any,
    prompts: dict[str, list[Prompt]],
    max_new_tokens: int,
    session: Any = None,
) -> dict[str, Any]:
    """Unsafe rate on held-out harmful prompts, benign refusal, reasoning accuracy, and the
    per-token KL of the student from the original model on its own benign answers.

    The answers are judged by the ``session``'s judges (the run's), the marker judge without.
    """
    from flipsearch.fliprate import Rate
    from flipsearch.scoring import response_logits, reverse_kl

    was_training = loaded.model.training
    loaded.model.eval()
    wrapped = LoadedModel(loaded.model, loaded.tokenizer, loaded.name, "eval")
    safety, refusal = (
        (session.judge("safety"), session.judge("refusal")) if session else ("refusal",) * 2
    )
    evaluator = Evaluator(wrapped, safety, refusal, decoding=Decoding(max_new_tokens), cache=None)
    baseline = StudentBaseline(
        evaluator.judged(prompts["harmful"], None, "safety"),
        evaluator.judged(prompts["benign"], None, "refusal") if prompts["benign"] else [],
    )
    solved: dict[str, float] = {}
    if prompts["reasoning"]:
        answers = evaluator.judged(prompts["reasoning"], None, "refusal")
        solved = {
            j.prompt.id: float(answer_is_correct(j.responses[0].text, j.prompt.answer or ""))
            for j in answers
        }
    correct = sum(solved.values())
    drift_sum, drift_tokens = 0.0, 0
    import torch

    original_loaded = LoadedModel(original, loaded.tokenizer, loaded.name, "original")
    for judged in baseline.benign:
        response = list(judged.responses[0].token_ids)
        if not response:
            continue
        ids = loaded.tokenizer(judged.rendered, add_special_tokens=False)["input_ids"]
        student = torch.log_softmax(response_logits(wrapped, ids, response), -1)
        reference = torch.log_softmax(response_logits(original_loaded, ids, response), -1)
        drift_sum += float(reverse_kl(student, reference).sum())
        drift_tokens += len(response)
    if was_training:
        loaded.model.train()
    return {
        "unsafe_rate": Rate.of(baseline.unsafe_rate.successes, baseline.unsafe_rate.n).to_dict(),
        "benign_refusal": baseline.benign_refusal.to_dict(),
        "reasoning_accuracy": Rate.of(correct, len(prompts["reasoning"])).to_dict(),
        "benign_kl_from_original": drift_sum / drift_tokens if drift_tokens else 0.0,
        # Per prompt, for the paired before/after tests (None: every verdict undecided).
        "outcomes": {
            "unsafe_rate": {j.prompt.id: j.unsafe_share for j in baseline.harmful},
            "benign_refusal": {j.prompt.id: j.refusal_share for j in baseline.benign},
            "reasoning_accuracy": solved,
        },
    }


def paired_before_after(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Exact McNemar (sign) p-value of each metric, before vs after, on the same prompts."""
    from flipsearch.fliprate import paired_test

    tests = {}
    for metric, outcomes in before.get("outcomes", {}).items():
        later = after.get("outcomes", {}).get(metric, {})
        common = [i for i, v in outcomes.items() if v is not None and later.get(i) is not None]
        p_value = paired_test([later[i] for i in common], [outcomes[i] for i in common])
        tests[metric] = {"p_value": p_value, "prompts": len(common)}
    return tests
