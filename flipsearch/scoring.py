"""Token-level scoring: where, in the student's own answer, does the teacher disagree?

The OPSA loss is a per-token divergence between the student's and the teacher's next-token
distributions on the student's response tokens. This module computes that divergence with the
frozen model, for the report's token-level analysis (the paper found it concentrated in the
first ~10-30 response tokens: the compliance decision).

With the ``vllm`` and ``openai`` backends the weights are not in this process; the backend's
scorer then gives the log-probability of each response token under both prompts, and the
per-token divergence is the sampled-token estimate log p_student(y) - log p_teacher(y) (the
single-sample estimator of reverse KL that OPSA's ``sampled`` support uses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flipsearch.models import LoadedModel
from flipsearch.reasoning import ReasoningFormat, ReasoningSplit


@dataclass
class TokenDivergence:
    """Per-token reverse KL(student ‖ teacher) of one response, and its tokens' text."""

    tokens: list[str]
    kl: list[float]
    teacher_logprob: list[float]
    student_logprob: list[float]


def reverse_kl(log_p: Any, log_q: Any) -> Any:
    """Per-position KL(p || q) from log-probabilities over the last axis: the one formula
    used by training's reported KL, the report's token analysis and the benign drift."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def response_logits(loaded: LoadedModel, prompt_ids: list[int], response_ids: Sequence[int]) -> Any:
    """Next-token logits at every response position: row i predicts ``response_ids[i]``."""
    import torch

    ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=loaded.model.device)
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids).logits[0]
    start = len(prompt_ids) - 1
    return logits[start : start + len(response_ids)].float()


def token_divergence(
    loaded: LoadedModel,
    student_prompt: str,
    teacher_prompt: str,
    response_ids: Sequence[int],
    max_tokens: int = 64,
) -> TokenDivergence:
    """Reverse KL between the student's and the teacher's distributions, token by token."""
    import torch

    tokenizer = loaded.tokenizer
    response = list(response_ids)[:max_tokens]
    if not response:
        return TokenDivergence([], [], [], [])
    student_ids = tokenizer(student_prompt, add_special_tokens=False)["input_ids"]
    teacher_ids = tokenizer(teacher_prompt, add_special_tokens=False)["input_ids"]
    student = torch.log_softmax(response_logits(loaded, student_ids, response), dim=-1)
    teacher = torch.log_softmax(response_logits(loaded, teacher_ids, response), dim=-1)
    kl = reverse_kl(student, teacher).clamp_min(0)
    index = torch.tensor(response, device=student.device).unsqueeze(-1)
    return TokenDivergence(
        tokens=[tokenizer.decode([t]) for t in response],
        kl=kl.tolist(),
        teacher_logprob=teacher.gather(-1, index).squeeze(-1).tolist(),
        student_logprob=student.gather(-1, index).squeeze(-1).tolist(),
    )


def sampled_token_divergence(
    scorer: Any,
    tokenizer: Any,
    student_prompt: str,
    teacher_prompt: str,
    response_ids: Sequence[int],
    max_tokens: int = 64,
) -> TokenDivergence:
    """The sampled-token estimate of reverse KL, from a backend's scorer (no local weights)."""
    response = list(response_ids)[:max_tokens]
    if not response:
        return TokenDivergence([], [], [], [])
    student, teacher = scorer.token_logprobs(
        [(student_prompt, response), (teacher_prompt, response)]
    )
    return TokenDivergence(
        tokens=[tokenizer.decode([t]) for t in response],
        kl=[s - t for s, t in zip(student, teacher, strict=True)],
        teacher_logprob=list(teacher),
        student_logprob=list(student),
    )


def analyse_context(
    loaded: LoadedModel,
    score: Any,
    limit: int = 16,
    max_tokens: int = 64,
    scorer: Any = None,
    fmt: ReasoningFormat | None = None,
) -> dict[str, Any]:
    """KL by token position over the student's unsafe answers, flips first (for the report).

    ``score`` is a ``ContextScore``; the first sample of each prompt is analysed. With a
    ``scorer`` (a backend's), the divergence is the sampled-token estimate. For a reasoning
    model the KL is also given from the answer's first token and split at the reasoning
    boundary (``fmt`` counts the reasoning's tokens), since the trace before it would
    otherwise fill the first ``max_tokens`` positions.
    """
    fmt = fmt or ReasoningFormat()
    pool = [o for o in score.harmful if (o.student.unsafe_share or 0) > 0]
    chosen = sorted(pool, key=lambda o: (-o.flip, o.student.prompt.id))[:limit]
    by_position, by_answer = _PositionMeans(max_tokens), _PositionMeans(max_tokens)
    reasoning_kl: list[float] = []
    answer_kl: list[float] = []  # the answer's first ``max_tokens`` tokens of each example
    examples = []
    for outcome in chosen:
        response = outcome.student.responses[0]
        thought = reasoning_token_count(
            loaded.tokenizer, response.token_ids, fmt, outcome.student.split(0)
        )
        # Scored far enough to reach the answer's first ``max_tokens`` tokens.
        arguments = (
            outcome.student.rendered,
            outcome.teacher.rendered,
            response.token_ids,
            thought + max_tokens,
        )
        if scorer is None:
            divergence = token_divergence(loaded, *arguments)
        else:
            divergence = sampled_token_divergence(scorer, loaded.tokenizer, *arguments)
        by_position.add(divergence.kl[:max_tokens])
        by_answer.add(divergence.kl[thought:])
        reasoning_kl += divergence.kl[:thought]
        answer_kl += divergence.kl[thought:]
        examples.append(
            {
                "prompt_id": outcome.student.prompt.id,
                "prompt": outcome.student.prompt.text,
                "flip": outcome.flip,
                "tokens": divergence.tokens[:max_tokens],
                "kl": divergence.kl[:max_tokens],
                "reasoning_tokens": thought,
            }
        )
    return {
        "context": score.context.id,
        "divergence": "reverse KL(student || teacher), full vocabulary, nats"
        if scorer is None
        else "reverse KL(student || teacher), sampled-token estimate log p_s(y) - log p_t(y), nats",
        "mean_kl_by_position": by_position.means(),
        "n_by_position": by_position.used_counts(),
        "examples": examples,
        "mean_kl_by_answer_position": by_answer.means(),
        "n_by_answer_position": by_answer.used_counts(),
        "mean_kl_reasoning": _mean(reasoning_kl),  # None: no example has reasoning
        "mean_kl_answer": _mean(answer_kl),
    }


class _PositionMeans:
    """Sums and counts of per-token values by position, for the first ``size`` positions."""

    def __init__(self, size: int) -> None:
        self.sums = [0.0] * size
        self.counts = [0] * size

    def add(self, values: Sequence[float]) -> None:
        for position, value in enumerate(values[: len(self.sums)]):
            self.sums[position] += value
            self.counts[position] += 1

    def used_counts(self) -> list[int]:
        """The counts up to the last position any value reached."""
        used = max((i + 1 for i, c in enumerate(self.counts) if c), default=0)
        return self.counts[:used]

    def means(self) -> list[float]:
        return [total / n for total, n in zip(self.sums, self.used_counts(), strict=False)]


def reasoning_token_count(
    tokenizer: Any,
    token_ids: Sequence[int],
    fmt: ReasoningFormat,
    split: ReasoningSplit | None = None,
) -> int:
    """Leading reasoning tokens of a response, end marker included (0 when ``split``, its
    judged split, found no reasoning)."""
    if split is not None and not split.has_reasoning:
        return 0
    return fmt.reasoning_tokens(tokenizer, token_ids)


def _mean(values: list[float]) -> float | None:
    """A per-token mean; None without tokens."""
    return sum(values) / len(values) if values else None
