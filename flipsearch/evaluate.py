"""Generate, judge and score: the student baseline and any number of contexts.

``Evaluator`` is the reusable piece the run pipeline, the search and ``flip_rate`` build on
(a ``Session`` wires one). Every generation goes through the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from flipsearch.backends._base import Decoding, Generation, Generator
from flipsearch.backends.cache import GenerationCache, generate_cached
from flipsearch.backends.hf import HFGenerator
from flipsearch.contexts import Context, Renderer
from flipsearch.errors import FlipsearchError
from flipsearch.fliprate import ContextScore, Judged, PairedOutcome, Rate, compare
from flipsearch.judging import JudgeSpec, get_judge
from flipsearch.leaderboard import rank_scores
from flipsearch.models import LoadedModel
from flipsearch.prompts import Prompt


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
    ) -> None:
        self.loaded = loaded
        self.judge = get_judge(judge, "safety")
        self.refusal_judge = get_judge(refusal_judge, "refusal")
        self.decoding = decoding or Decoding()
        self.cache = cache
        self.generator = generator or HFGenerator(loaded, batch_size=batch_size)
        self.renderer = Renderer(loaded.tokenizer, self.decoding.max_new_tokens, loaded.max_length)
        self.progress = progress
        self.generated = {"student": 0, "teacher": 0}  # prompts actually generated (not cached)
        # One judged prompt per (context, role, prompt): a prompt judged in a search chunk is
        # not judged again when its context is scored on the whole split.
        self._memo: dict[tuple[str | None, str, str, str], Judged] = {}

    def judged(self, prompts: Sequence[Prompt], context: Context | None, role: str) -> list[Judged]:
        """Responses to ``prompts`` (with ``context``, or as the student) and their verdicts."""
        condition = None if context is None else f"{context.placement}\n{context.text}"
        keys = [(condition, role, p.id, p.text) for p in prompts]
        missing = list(
            {k: p for k, p in zip(keys, prompts, strict=True) if k not in self._memo}.items()
        )
        if missing:
            todo = [p for _, p in missing]
            rendered = self.renderer.render_all([p.text for p in todo], context)
            responses = self._generate(rendered, context, f"{role} prompts")
            judge = self.judge if role == "safety" else self.refusal_judge
            pairs = [
                (p.text, g.text)
                for p, samples in zip(todo, responses, strict=True)
                for g in samples
            ]
            verdicts = judge.judge(pairs)
            if len(verdicts) != len(pairs):
                raise FlipsearchError(
                    f"judge {judge.name!r} returned {len(verdicts)} verdicts for "
                    f"{len(pairs)} responses"
                )
            n = self.decoding.samples
            for i, ((key, prompt), text, samples) in enumerate(
                zip(missing, rendered, responses, strict=True)
            ):
                self._memo[key] = Judged(prompt, text, list(samples), verdicts[i * n : (i + 1) * n])
        return [self._memo[key] for key in keys]

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

    def ranked(self) -> list[ContextScore]:
        """Best flip rate first, then lower benign refusal (no limit applies here)."""
        return rank_scores(self.scores, max_benign_refusal=float("inf"))

    def to_pandas(self) -> pd.DataFrame:
        """One row per context (best first), with counts, intervals and a paired p-value
        against the best context on the same prompts."""
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
            "student_unsafe_rate": self.student.unsafe_rate.to_dict(),
            "student_benign_refusal": self.student.benign_refusal.to_dict(),
            "contexts": self.to_pandas().to_dict(orient="records"),
        }
