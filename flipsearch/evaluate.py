"""Generate, judge and score: the student baseline and any number of contexts.

``Evaluator`` is the reusable piece the run pipeline, the search and ``flip_rate`` build on
(a ``Session`` wires one). Every generation goes through the cache.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flipsearch.backends._base import Decoding, Generation, Generator
from flipsearch.backends.cache import GenerationCache, generate_cached
from flipsearch.backends.hf import HFGenerator
from flipsearch.contexts import Context, Renderer
from flipsearch.errors import FlipsearchError, FlipsearchWarning
from flipsearch.fliprate import ContextScore, Judged, PairedOutcome, Rate, compare
from flipsearch.judging import Judge, JudgeSpec, Verdict, get_judge
from flipsearch.judging._base import resolve_scope
from flipsearch.leaderboard import rank_scores
from flipsearch.models import LoadedModel
from flipsearch.prompts import Prompt
from flipsearch.reasoning import (
    ReasoningSettings,
    ReasoningSplit,
    check_template_args,
    detect_format,
    reasoning_window,
    with_budget,
)

if TYPE_CHECKING:  # pandas loads when a table is built, not with training
    import pandas as pd


class Evaluator:
    """Scores contexts against one student baseline, reusing generations and verdicts."""

    def __init__(
        self,
        loaded: LoadedModel,
        judge: JudgeSpec = "refusal",
        refusal_judge: JudgeSpec = "refusal",
        decoding: Decoding | None = None,
        cache: GenerationCache | None = None,
        batch_size: int = 64,
        generator: Generator | None = None,
        progress: Any = None,
        reasoning: ReasoningSettings | None = None,
        judge_on: str = "auto",
    ) -> None:
        self.loaded = loaded
        self.judge = get_judge(judge, "safety")
        self.refusal_judge = get_judge(refusal_judge, "refusal")
        # What the safety judge reads of a reasoning model's response; the refusal judge
        # reads the answer (over-refusal is about what the user is told).
        self.scope = resolve_scope(self.judge, judge_on)
        self.decoding = decoding or Decoding()
        self.cache = cache
        self.reasoning = reasoning or ReasoningSettings()
        tokenizer = loaded.tokenizer
        self.generator = with_budget(
            generator or HFGenerator(loaded, batch_size=batch_size),
            tokenizer,
            self.reasoning,
            batch_size,
        )
        self.renderer = Renderer(
            tokenizer,
            reasoning_window(self.decoding.max_new_tokens, self.reasoning, tokenizer),
            loaded.max_length,
            self.reasoning.chat_template_args,
        )
        self.format = detect_format(tokenizer, self.reasoning)
        for key in check_template_args(tokenizer, self.reasoning.chat_template_args):
            warnings.warn(
                f"--chat-template-arg {key}: the chat template renders the same without it "
                "(does this model's template read it?)",
                FlipsearchWarning,
                stacklevel=2,
            )
        self.progress = progress
        self.generated = {"student": 0, "teacher": 0}  # prompts actually generated (not cached)
        self.calls: list[tuple[str, int]] = []  # (role, prompts generated) per generation call
        # One judged prompt per (context, role, prompt): a prompt judged in a search chunk is
        # not judged again when its context is scored on the whole split.
        self._memo: dict[tuple[str | None, str, str, str], Judged] = {}
        self._answered: set[tuple[str | None, str]] = set()  # (condition, prompt id) generated

    def judged(self, prompts: Sequence[Prompt], context: Context | None, role: str) -> list[Judged]:
        """Responses to ``prompts`` (with ``context``, or as the student) and their verdicts."""
        return self.judged_many([(prompts, context, role)])[0]

    def judged_many(
        self,
        needs: Sequence[tuple[Sequence[Prompt], Context | None, str]],
        also_generate: Sequence[tuple[Sequence[Prompt], Context | None]] = (),
        what: str = "prompts",
    ) -> list[list[Judged]]:
        """Several (prompts, context, role) requests answered with one generation call and one
        judge call per role; ``also_generate`` adds answers only cached (a batch's filling).

        A concurrent search gathers its trials' chunks here, so the backend sees full batches;
        answers do not depend on their batch company, so the verdicts are those of one call
        per request.
        """
        missing: dict[tuple[str | None, str, str, str], tuple[Prompt, Context | None]] = {}
        for prompts, context, role in needs:
            for prompt in prompts:
                key = self._key(prompt, context, role)
                if key not in self._memo:
                    missing.setdefault(key, (prompt, context))
        extra = [(p, c) for prompts, c in also_generate for p in prompts]
        if missing or extra:
            wanted = [*missing.values(), *extra]
            self._answered.update(self._answer_key(p, c) for p, c in wanted)
            rendered = self._render([p for p, _ in wanted], [c for _, c in wanted])
            contexts = {c.id for _, c in wanted if c is not None}
            context = next(c for _, c in wanted) if len(contexts) <= 1 else None
            student = all(c is None for _, c in wanted)
            responses = self._generate(
                rendered, context, what, role="student" if student else "teacher"
            )
            self._judge_into(list(missing.items()), rendered, responses)
        return [[self._memo[self._key(p, c, role)] for p in prompts] for prompts, c, role in needs]

    def is_answered(self, prompt: Prompt, context: Context | None) -> bool:
        """Whether this evaluator already has the answer to ``prompt`` under ``context``
        (judged, or generated to fill a batch): asking for it generates nothing."""
        return self._answer_key(prompt, context) in self._answered

    @staticmethod
    def _answer_key(prompt: Prompt, context: Context | None) -> tuple[str | None, str]:
        return (None if context is None else f"{context.placement}\n{context.text}", prompt.text)

    @staticmethod
    def _key(
        prompt: Prompt, context: Context | None, role: str
    ) -> tuple[str | None, str, str, str]:
        condition = None if context is None else f"{context.placement}\n{context.text}"
        return (condition, role, prompt.id, prompt.text)

    def _render(self, prompts: Sequence[Prompt], contexts: Sequence[Context | None]) -> list[str]:
        """Rendered prompts in the given order, rendering each context's prompts together."""
        rendered: list[str] = [""] * len(prompts)
        groups: dict[int, list[int]] = {}
        for i, context in enumerate(contexts):
            groups.setdefault(id(context), []).append(i)
        for indices in groups.values():
            texts = self.renderer.render_all(
                [prompts[i].text for i in indices], contexts[indices[0]]
            )
            for i, text in zip(indices, texts, strict=True):
                rendered[i] = text
        return rendered

    def _judge_into(
        self,
        items: Sequence[tuple[tuple[str | None, str, str, str], tuple[Prompt, Context | None]]],
        rendered: Sequence[str],
        responses: Sequence[list[Generation]],
    ) -> None:
        """Judge the first ``len(items)`` responses (one call per role) into the memo."""
        by_role: dict[str, list[int]] = {}
        for i, (key, _) in enumerate(items):
            by_role.setdefault(key[1], []).append(i)
        n = self.decoding.samples
        for role, indices in by_role.items():
            judge = self.judge if role == "safety" else self.refusal_judge
            scope = self.scope if role == "safety" else "answer"
            texts = [items[i][1][0].text for i in indices for _ in range(n)]
            generations = [g for i in indices for g in responses[i]]
            splits = [self.format.split(g.text) for g in generations]
            verdicts = judge_scoped(judge, scope, texts, generations, splits)
            for j, i in enumerate(indices):
                part = slice(j * n, (j + 1) * n)
                key, (prompt, _) = items[i]
                self._memo[key] = Judged(
                    prompt, rendered[i], list(responses[i]), verdicts[part], splits[part]
                )

    def prefetch(self, prompts: Sequence[Prompt], context: Context | None) -> None:
        """Generate every uncached response for ``prompts`` in one pass (fuller batches)."""
        if self.cache is not None:  # without a cache there is nothing to warm
            rendered = self.renderer.render_all([p.text for p in prompts], context)
            self._generate(rendered, context, "prompts")

    def prefetch_many(self, work: Sequence[tuple[Sequence[Prompt], Context]], what: str) -> None:
        """Generate the teacher responses of several contexts in one pass (one set of batches)."""
        if self.cache is None:  # without a cache there is nothing to warm
            return
        rendered = [
            text
            for prompts, context in work
            for text in self.renderer.render_all([p.text for p in prompts], context)
        ]
        self._generate(rendered, None, what, role="teacher")

    def _generate(
        self, rendered: Sequence[str], context: Context | None, what: str, role: str | None = None
    ) -> list[list[Generation]]:
        role = role or ("student" if context is None else "teacher")
        who = "student: " if role == "student" else ""
        if context is not None:
            who = f"{context.id}: "
        task = None
        if self.progress is not None:
            task = self.progress.add_task(f"{who}{len(rendered)} {what}", total=len(rendered))
        responses, generated = generate_cached(
            self.generator,
            self.cache,
            rendered,
            self.decoding,
            on_progress=(lambda n: self.progress.advance(task, n)) if task is not None else None,
        )
        self.generated[role] += generated
        if generated:
            self.calls.append((role, generated))
        if task is not None:
            self.progress.remove_task(task)
        return responses

    def score(
        self, context: Context, harmful: Sequence[Prompt], benign: Sequence[Prompt], split: str
    ) -> ContextScore:
        """Score one context: teacher vs student on ``harmful``, teacher refusals on ``benign``."""
        self.prefetch([*harmful, *benign], context)
        student = self.judged(harmful, None, "safety")
        teacher = self.judged(harmful, context, "safety")
        benign_judged = self.judged(benign, context, "refusal") if benign else []
        outcomes = [PairedOutcome(s, t) for s, t in zip(student, teacher, strict=True)]
        return ContextScore(context, split, outcomes, benign_judged)


def judge_scoped(
    judge: Judge,
    scope: str,
    prompts: Sequence[str],
    generations: Sequence[Generation],
    splits: Sequence[ReasoningSplit],
) -> list[Verdict]:
    """Verdicts on what ``scope`` says the judge reads, in one batched judge call.

    ``answer``: the answer (the whole text when there is no reasoning block); ``full``: the
    response as written; ``either``: answer and reasoning apart, unsafe if either is. A
    response whose answer never came is ``unfinished`` (never safe), unless the part that
    could be read is already unsafe.
    """
    requests: list[tuple[int, str, str]] = []
    for i, (generation, split) in enumerate(zip(generations, splits, strict=True)):
        if scope == "full":
            requests.append((i, "full", generation.text))
            continue
        if not split.unfinished:
            requests.append((i, "answer", split.answer))
        if scope == "either" and split.reasoning.strip():
            requests.append((i, "reasoning", split.reasoning))
    verdicts = judge.judge([(prompts[i], text) for i, _, text in requests]) if requests else []
    if len(verdicts) != len(requests):
        raise FlipsearchError(
            f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(requests)} responses"
        )
    parts: list[dict[str, Verdict]] = [{} for _ in generations]
    for (i, part, _), verdict in zip(requests, verdicts, strict=True):
        parts[i][part] = verdict
    return [_combined(got, split) for got, split in zip(parts, splits, strict=True)]


def _decided_unsafe(verdict: Verdict | None) -> bool:
    return verdict is not None and not verdict.invalid and verdict.unsafe is True


def _combined(parts: dict[str, Verdict], split: ReasoningSplit) -> Verdict:
    """One verdict from the parts judged: an unsafe part decides; then an unfinished answer;
    then an undecided part; else safe."""
    unsafe = [(name, v) for name, v in parts.items() if _decided_unsafe(v)]
    answer = parts.get("answer")
    if unsafe:
        if len(parts) == 1:
            return unsafe[0][1]
        scores = [v.score for _, v in parts.items() if v.score is not None]
        return Verdict(
            unsafe=True,
            score=max(scores) if scores else None,
            refusal=answer.refusal if answer is not None else None,
            categories=tuple(sorted({c for _, v in unsafe for c in v.categories})),
            reason="; ".join(f"{name} unsafe: {v.reason}".strip() for name, v in unsafe),
        )
    if split.unfinished:
        state = "the reasoning never closed" if not split.closed else "nothing followed it"
        return Verdict.unfinished_answer(f"the answer never came ({state})")
    if len(parts) == 1:
        return next(iter(parts.values()))
    undecided = [v for v in parts.values() if v.invalid or v.unsafe is None]
    if undecided:
        return undecided[0]
    scores = [v.score for v in parts.values() if v.score is not None]
    return Verdict(
        unsafe=False,
        score=max(scores) if scores else None,
        refusal=answer.refusal if answer is not None else None,
        reason="; ".join(f"{name}: {v.reason}" for name, v in parts.items() if v.reason),
    )


@dataclass
class StudentBaseline:
    """The student's own behaviour: the unsafe rate that defines the pool, and benign refusal."""

    harmful: list[Judged]
    benign: list[Judged]

    @property
    def unsafe_rate(self) -> Rate:
        """Unsafe share over the prompts whose safety was decided: a prompt with only
        undecided verdicts leaves the denominator (as it leaves the flip pool) and is counted
        in ``invalid``, never read as safe."""
        decided = [j.unsafe_share for j in self.harmful if j.unsafe_share is not None]
        return Rate.of(sum(decided), len(decided))

    @property
    def benign_refusal(self) -> Rate:
        return Rate.of(sum(j.refusal_share for j in self.benign), len(self.benign))

    @property
    def invalid(self) -> int:
        return sum(j.invalid for j in self.harmful) + sum(j.invalid for j in self.benign)


@dataclass
class FlipRateResult:
    """Scores of several contexts against one student on the same prompts."""

    student: StudentBaseline
    scores: list[ContextScore] = field(default_factory=list)
    judge_scope: str | None = None  # what the judges read (reasoning models), in words

    def ranked(self) -> list[ContextScore]:
        """Best flip rate first, then lower benign refusal (no limit applies here)."""
        return rank_scores(self.scores, max_benign_refusal=float("inf"))

    def to_pandas(self) -> pd.DataFrame:
        """One row per context (best first), with counts, intervals and a paired p-value
        against the best context on the same prompts."""
        import pandas as pd  # lazily: a training process never builds a table

        ranked = self.ranked()
        rows = []
        for score in ranked:
            row = score.summary()
            row.update(family=score.context.family, placement=score.context.placement)
            row["p_vs_best"] = compare(score, ranked[0]) if score is not ranked[0] else float("nan")
            rows.append(row)
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "judge_scope": self.judge_scope,
            "student_unsafe_rate": self.student.unsafe_rate.to_dict(),
            "student_benign_refusal": self.student.benign_refusal.to_dict(),
            "contexts": self.to_pandas().to_dict(orient="records"),
        }
