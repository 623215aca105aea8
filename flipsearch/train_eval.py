"""Before/after evaluation of a trained student: safety, over-refusal, reasoning, drift.

Reasoning is measured twice, because a safety tax is usually small and the prompts few:

* ``reasoning_accuracy``: the share of reasoning prompts whose answer (``judged.split(0)
  .answer``: after the reasoning block, for reasoning models) gives the reference answer
  (``flipsearch.answers``); an answer that never came is wrong and counted in
  ``reasoning_unfinished``. Before vs after: exact McNemar on the per-prompt outcomes.
* ``reference_loglik``: the mean per-token log-likelihood (nats) of each prompt's reference
  solution under the student, given the plain rendered prompt. It is continuous, needs no
  generation and moves when the model's grip on the solution loosens even if no answer flips
  yet, so it has power on few prompts. Before vs after: Wilcoxon signed-rank on the per-prompt
  values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from flipsearch.answers import is_correct, looks_multiple_choice
from flipsearch.backends._base import Decoding
from flipsearch.evaluate import Evaluator, StudentBaseline
from flipsearch.fliprate import Judged
from flipsearch.models import LoadedModel
from flipsearch.prompts import Prompt, split_harmful

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_WORD = re.compile(r"[a-z]+")
# GSM8K's calculator annotations ("<<6*4=24>>"): tool markup no model writes, left out of
# the reference solution whose likelihood is measured.
_CALCULATOR = re.compile(r"<<[^<>]*>>")

EVALUATION_SPLIT = "a seeded, category-stratified 30% of the harmful and of the benign prompts"
# The paired test of each metric: 0/1 outcomes (shares, for several samples) get the exact
# McNemar (sign) test, continuous values the Wilcoxon signed-rank test.
CONTINUOUS_METRICS = frozenset({"reference_loglik"})
MCNEMAR, WILCOXON = "mcnemar-exact", "wilcoxon"
# Per-prompt differences smaller than this (nats per token) are float noise: ties.
_TIE = 1e-9


def split_for_training(prompts: Sequence[Prompt], seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Train on the search split, evaluate on the held-out split (the run's own split)."""
    return split_harmful(list(prompts), 0.3, seed) if len(prompts) > 1 else (list(prompts), [])


def answer_is_correct(response: str, answer: str) -> bool:
    """The earlier short-answer rule (a numeric answer must be the first number of the
    response, a word answer one of its first eight words), kept for callers of it; the
    evaluation grades with ``flipsearch.answers.is_correct``."""
    text = response.lower()
    try:
        expected = float(answer)
    except ValueError:
        return answer.lower() in _WORD.findall(text)[:8]
    found = _NUMBER.search(text.replace(",", ""))
    return found is not None and abs(float(found.group()) - expected) < 1e-9


def grade_reasoning(answers: Sequence[Judged]) -> tuple[dict[str, float], int]:
    """Per prompt 1.0 (correct) or 0.0 from its first sample's answer part, and how many of
    those answers never came (unfinished: wrong, and counted apart so a reasoning model that
    runs out of tokens is told from one that answers wrongly)."""
    solved: dict[str, float] = {}
    unfinished = 0
    for judged in answers:
        split = judged.split(0)
        reference = judged.prompt.answer or ""
        if split.unfinished:
            unfinished += 1
            solved[judged.prompt.id] = 0.0
            continue
        choices = looks_multiple_choice(judged.prompt.text, reference)
        solved[judged.prompt.id] = float(is_correct(split.answer, reference, choices))
    return solved, unfinished


def reference_text(prompt: Prompt) -> str:
    """What the log-likelihood is measured on: the worked solution (GSM8K's calculator
    annotations left out), else a short sentence giving the answer."""
    if prompt.solution and prompt.solution.strip():
        return _CALCULATOR.sub("", prompt.solution).strip()
    return f"The answer is {prompt.answer}."


def reference_logliks(loaded: LoadedModel, items: Sequence[tuple[Prompt, str]]) -> dict[str, float]:
    """Per prompt, the mean per-token log-likelihood (nats) of ``reference_text`` under the
    model, after the rendered plain prompt (``items``: prompt and its rendering). A reference
    longer than the model's context is cut to fit; one with no tokens is left out."""
    import torch

    from flipsearch.scoring import response_logits

    tokenizer = loaded.tokenizer
    values: dict[str, float] = {}
    for prompt, rendered in items:
        prompt_ids = list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        response = list(tokenizer(reference_text(prompt), add_special_tokens=False)["input_ids"])
        if loaded.max_length is not None:
            response = response[: max(0, loaded.max_length - len(prompt_ids))]
        if not response or not prompt_ids:
            continue
        log_probs = torch.log_softmax(response_logits(loaded, prompt_ids, response), -1)
        index = torch.tensor(response, device=log_probs.device).unsqueeze(-1)
        values[prompt.id] = float(log_probs.gather(-1, index).mean())
    return values


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean with its t-interval over prompts (``low``/``high`` None below two values, when
    no spread can be estimated), and ``n``."""
    from scipy.stats import t

    n = len(values)
    if n == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    mean = math.fsum(values) / n
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": 1}
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def evaluate_student(
    loaded: LoadedModel,
    original: Any,
    prompts: dict[str, list[Prompt]],
    max_new_tokens: int,
    session: Any = None,
) -> dict[str, Any]:
    """Unsafe rate on held-out harmful prompts, benign refusal, reasoning accuracy and the
    reference solutions' log-likelihood, and the per-token KL of the student from the original
    model on its own benign answers.

    The answers are judged by the ``session``'s judges (the run's), the marker judge without;
    the session's reasoning settings (markers, thinking budget) split reasoning from answer.
    """
    from flipsearch.fliprate import Rate
    from flipsearch.scoring import response_logits, reverse_kl

    was_training = loaded.model.training
    loaded.model.eval()
    wrapped = LoadedModel(loaded.model, loaded.tokenizer, loaded.name, "eval")
    safety, refusal = (
        (session.judge("safety"), session.judge("refusal")) if session else ("refusal",) * 2
    )
    evaluator = Evaluator(
        wrapped,
        safety,
        refusal,
        decoding=Decoding(max_new_tokens),
        cache=None,
        reasoning=getattr(session, "reasoning_settings", None),
        judge_on=getattr(session, "judge_on", "auto"),
    )
    baseline = StudentBaseline(
        evaluator.judged(prompts["harmful"], None, "safety"),
        evaluator.judged(prompts["benign"], None, "refusal") if prompts["benign"] else [],
    )
    solved: dict[str, float] = {}
    unfinished = 0
    logliks: dict[str, float] = {}
    if prompts["reasoning"]:
        answers = evaluator.judged(prompts["reasoning"], None, "refusal")
        solved, unfinished = grade_reasoning(answers)
        logliks = reference_logliks(wrapped, [(j.prompt, j.rendered) for j in answers])
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
        "reasoning_unfinished": unfinished,
        "reference_loglik": {
            **mean_interval(list(logliks.values())),
            "unit": "nats per token",
            "interval": "95% t-interval over prompts",
        },
        "benign_kl_from_original": drift_sum / drift_tokens if drift_tokens else 0.0,
        # Per prompt, for the paired before/after tests (None: every verdict undecided).
        "outcomes": {
            "unsafe_rate": {j.prompt.id: j.unsafe_share for j in baseline.harmful},
            "benign_refusal": {j.prompt.id: j.refusal_share for j in baseline.benign},
            "reasoning_accuracy": solved,
            "reference_loglik": logliks,
        },
    }


def wilcoxon_p(after: Sequence[float], before: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired continuous values; 1.0 when every
    difference is a tie (``_TIE``), where scipy has no statistic to give."""
    from scipy.stats import wilcoxon

    differences = [a - b for a, b in zip(after, before, strict=True)]
    moved = [d for d in differences if abs(d) > _TIE]
    if not moved:
        return 1.0
    return float(wilcoxon(moved).pvalue)


def paired_before_after(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Each metric before vs after on the same prompts: its p-value, the test that gave it
    (``mcnemar-exact`` for per-prompt 0/1 outcomes, ``wilcoxon`` for the continuous
    ``CONTINUOUS_METRICS``) and the number of prompts both sides measured."""
    from flipsearch.fliprate import paired_test

    tests = {}
    for metric, outcomes in before.get("outcomes", {}).items():
        later = after.get("outcomes", {}).get(metric, {})
        common = [i for i, v in outcomes.items() if v is not None and later.get(i) is not None]
        then, now = [outcomes[i] for i in common], [later[i] for i in common]
        result: dict[str, Any] = {"prompts": len(common)}
        if metric in CONTINUOUS_METRICS:
            result.update(p_value=wilcoxon_p(now, then), test=WILCOXON)
            if common:
                result["mean_difference"] = math.fsum(now) / len(now) - math.fsum(then) / len(then)
        else:
            result.update(p_value=paired_test(now, then), test=MCNEMAR)
        tests[metric] = result
    return tests
