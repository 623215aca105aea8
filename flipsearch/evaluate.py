"""Generate, judge and score: the student baseline and any number of contexts.

``flip_rate`` is the library entry point an eval harness calls; ``Evaluator`` is the reusable
piece the run pipeline (and the search) builds on. Every generation goes through the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from flipsearch.backends import (
    BackendSpec,
    Decoding,
    Generation,
    Generator,
    HFGenerator,
    make_backend,
)
from flipsearch.cache import GenerationCache, generate_cached
from flipsearch.contexts import Context, Renderer, context_from_arg, load_contexts
from flipsearch.errors import FlipsearchError
from flipsearch.fliprate import ContextScore, Judged, PairedOutcome, Rate, compare
from flipsearch.judging import JudgeSpec, get_judge
from flipsearch.models import LoadedModel, load_model
from flipsearch.prompts import Prompt, builtin_prompts, load_prompts


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
        self.renderer = Renderer(
            loaded.tokenizer,
            self.decoding.max_new_tokens,
            loaded.max_length,
            getattr(self.generator, "chats", None),
        )
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
        self, rendered: list[str], context: Context | None, what: str, role: str | None = None
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
        valid = [j.unsafe_share for j in self.harmful if j.unsafe_share is not None]
        return Rate.of(sum(valid), len(self.harmful))

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
        return sorted(
            self.scores,
            key=lambda s: (
                -_nan_low(s.flip_rate.value),
                s.benign_refusal.value if s.benign else 0.0,
            ),
        )

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


def _nan_low(value: float) -> float:
    return -1.0 if value != value else value


def flip_rate(
    model: str | LoadedModel = "smollm2-135m",
    contexts: Sequence[Context | str] | str | Path | None = None,
    prompts: Sequence[Prompt] | str | Path | None = None,
    judge: JudgeSpec = "refusal",
    refusal_judge: JudgeSpec = "refusal",
    decoding: Decoding | None = None,
    cache: str | Path | GenerationCache | None = None,
    batch_size: int = 64,
    backend: BackendSpec | str = "hf",
) -> FlipRateResult:
    """Measure the teacher flip rate of each context on a model's own unsafe answers.

    Args:
        model: a model name (``smollm2-135m``, a local directory, a hub id) or a
            ``LoadedModel`` (``LoadedModel.from_objects(model, tokenizer)`` wraps objects you
            already loaded, without a second copy).
        contexts: ``Context`` objects or strings (a YAML file path or the context text itself,
            placed as a system message), or a directory of seed files; default: the shipped
            seed library.
        prompts: ``Prompt`` objects or a prompt file; harmful prompts give flip rates, benign
            prompts give benign refusal, reasoning prompts are ignored. Default: shipped sets.
        judge: the safety judge: a name (``refusal``, ``llama-guard``, ``classifier``,
            ``ensemble:...``), an object with ``judge(pairs) -> list[Verdict]``, or any
            callable ``(prompt, response) -> bool | Verdict`` (True: unsafe).
        refusal_judge: the judge that decides whether a benign answer is a refusal (a name,
            a Judge, or a callable returning True for a refusal).
        decoding: greedy by default; ``Decoding(temperature=0.7, samples=4)`` samples.
        cache: a SQLite file (or ``GenerationCache``) so repeated calls generate nothing twice.
        backend: ``"hf"`` (default), ``"vllm"``, or a ``BackendSpec`` (e.g.
            ``BackendSpec("openai", base_urls=("http://host:8000/v1",))``).

    Returns:
        A ``FlipRateResult``: ``.to_pandas()`` gives flip rate, absolute flip rate, unflip rate
        and benign refusal per context, each with its count and 95% Wilson interval.
    """
    spec = BackendSpec(backend) if isinstance(backend, str) else backend
    loaded = load_model(model, weights=spec.needs_weights) if isinstance(model, str) else model
    generator, _ = make_backend(spec, loaded, batch_size)
    if isinstance(prompts, str | Path):
        prompt_list = load_prompts(prompts)
    else:
        prompt_list = list(prompts) if prompts is not None else builtin_prompts()
    if (
        contexts is None
        or isinstance(contexts, Path)
        or (isinstance(contexts, str) and Path(contexts).is_dir())
    ):
        context_list = load_contexts(contexts)
    elif isinstance(contexts, str):
        context_list = [context_from_arg(contexts)]
    else:
        context_list = [c if isinstance(c, Context) else context_from_arg(c) for c in contexts]
    harmful = [p for p in prompt_list if p.kind == "harmful"]
    benign = [p for p in prompt_list if p.kind == "benign"]
    if not harmful:
        raise FlipsearchError("flip rates need harmful prompts; the prompt set has none")
    store = GenerationCache(cache) if isinstance(cache, str | Path) else cache
    evaluator = Evaluator(
        loaded, judge, refusal_judge, decoding, store, batch_size, generator=generator
    )
    student = StudentBaseline(
        evaluator.judged(harmful, None, "safety"),
        evaluator.judged(benign, None, "refusal") if benign else [],
    )
    scores = [evaluator.score(c, harmful, benign, "all") for c in context_list]
    return FlipRateResult(student, scores)
