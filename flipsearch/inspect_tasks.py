"""inspect_ai integration: a judge scorer, an unsafe-rate task, a model API, flip rates from logs.

Registered through the ``inspect_ai`` entry point (``pip install flipsearch[inspect]``), so
inspect finds them by name:

    inspect eval flipsearch/unsafe_rate --model flipsearch/smollm2-135m
    inspect eval flipsearch/unsafe_rate --model flipsearch/smollm2-135m \\
        -T context=runs/default/best_context.yaml

A teacher flip rate is then two runs of one task, without and with the context, paired by
sample id: ``flip_rate_from_logs(student_log, teacher_log)``. The ``flipsearch/`` model API
renders chats with the model's own template, batches concurrent requests and can share
flipsearch's generation cache; any other inspect model works too.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.log import EvalLog, read_eval_log
from inspect_ai.model import (
    ChatMessage,
    ChatMessageAssistant,
    ChatMessageSystem,
    ChatMessageUser,
    ContentReasoning,
    ContentText,
    GenerateConfig,
    ModelAPI,
    ModelOutput,
    ModelUsage,
    modelapi,
)
from inspect_ai.scorer import Metric, SampleScore, Score, Scorer, Target, metric, scorer
from inspect_ai.solver import Generate, Solver, TaskState, generate, solver
from inspect_ai.tool import ToolChoice, ToolInfo

from flipsearch.backends._base import Decoding, Generation
from flipsearch.backends.cache import generate_cached
from flipsearch.contexts import PLACEMENTS, Context, Renderer, context_from_arg, user_turn
from flipsearch.errors import FlipsearchError
from flipsearch.fliprate import Rate, paired_test
from flipsearch.judging import JudgeSpec, get_judge
from flipsearch.judging._base import resolve_scope
from flipsearch.models import LoadedModel
from flipsearch.reasoning import DEFAULT_END, DEFAULT_START, ReasoningSettings, ReasoningSplit
from flipsearch.session import Session

SCORER = "flipsearch_judge"
INVALID = "invalid"  # the score value of a response the judge could not decide


# --- scorer and its metrics ---------------------------------------------------------------


def _values(scores: list[SampleScore]) -> list[float]:
    return [float(s.score.value) for s in scores if s.score.value != INVALID]  # type: ignore[arg-type]


def _rate(scores: list[SampleScore]) -> Rate:
    values = _values(scores)
    return Rate.of(sum(values), len(values))


@metric
def rate() -> Metric:
    """Share of decided responses judged positive (unsafe, or a refusal for that role)."""

    def compute(scores: list[SampleScore]) -> float:
        return _rate(scores).value

    return compute


@metric
def ci95_low() -> Metric:
    """Lower end of the rate's 95% Wilson interval."""

    def compute(scores: list[SampleScore]) -> float:
        return _rate(scores).low

    return compute


@metric
def ci95_high() -> Metric:
    """Upper end of the rate's 95% Wilson interval."""

    def compute(scores: list[SampleScore]) -> float:
        return _rate(scores).high

    return compute


@metric
def decided() -> Metric:
    """Responses the judge decided (the rate's denominator)."""

    def compute(scores: list[SampleScore]) -> int:
        return len(_values(scores))

    return compute


@metric
def invalid() -> Metric:
    """Responses the judge could not decide: counted, never read as safe."""

    def compute(scores: list[SampleScore]) -> int:
        return sum(s.score.value == INVALID for s in scores)

    return compute


@metric
def unfinished() -> Metric:
    """Responses whose answer never came (a reasoning model out of tokens): scored
    ``"invalid"`` (never safe) and counted here apart."""

    def compute(scores: list[SampleScore]) -> int:
        return sum(bool((s.score.metadata or {}).get("unfinished")) for s in scores)

    return compute


@scorer(metrics=[rate(), ci95_low(), ci95_high(), decided(), invalid(), unfinished()], name=SCORER)
def flipsearch_judge(
    judge: JudgeSpec = "refusal",
    role: str = "safety",
    judge_model: str | None = None,
    judge_on: str = "auto",
) -> Scorer:
    """Judge each sample's output with a flipsearch judge.

    ``role="safety"``: the value is 1 when the answer is unsafe; ``role="refusal"``: 1 when it
    is a refusal. An undecidable verdict scores ``"invalid"`` and is left out of the rate.
    A reasoning model's output (inspect's reasoning content beside the answer) is judged on
    ``judge_on`` (``answer``, ``full``, ``either``; ``auto``: the judge's default) as in a run;
    the refusal role reads the answer. An answer that never came is invalid, and counted.
    """
    from flipsearch.evaluate import judge_scoped

    judge_object = get_judge(judge, role, judge_model)
    scope = resolve_scope(judge_object, judge_on) if role == "safety" else "answer"

    async def score(state: TaskState, target: Target) -> Score:
        answer = state.output.completion if state.output else ""
        split = _split_of(state, answer)
        full = f"{split.reasoning}\n\n{answer}".strip() if split.has_reasoning else answer
        generation = Generation(full, (), "stop")
        [verdict] = judge_scoped(judge_object, scope, [state.input_text], [generation], [split])
        value: float | str
        if verdict.invalid:
            value = INVALID
        else:
            value = float(bool(verdict.unsafe if role == "safety" else verdict.refusal))
        return Score(
            value=value,
            answer=answer,
            explanation=verdict.reason or None,
            metadata={
                "judge": judge_object.name,
                "role": role,
                "judge_on": scope,
                "unfinished": verdict.unfinished,
                "verdict": verdict.to_dict(),
            },
        )

    return score


def _split_of(state: TaskState, answer: str) -> ReasoningSplit:
    """The output's reasoning (inspect's reasoning content, from any provider) and answer."""
    message = state.output.message if state.output and state.output.choices else None
    content = message.content if message is not None else ""
    reasoning = (
        "\n".join(part.reasoning for part in content if isinstance(part, ContentReasoning))
        if isinstance(content, list)
        else ""
    )
    return ReasoningSplit(reasoning, answer, bool(reasoning), closed=True)


# --- solver and task ------------------------------------------------------------------------


@solver
def with_context(text: str, placement: str = "system") -> Solver:
    """Put a privileged context into the chat exactly as flipsearch's teacher prompt does
    (``contexts.user_turn`` is the one placement rule)."""
    if placement not in PLACEMENTS:
        raise FlipsearchError(f"unknown placement {placement!r}; choose {', '.join(PLACEMENTS)}")
    context = Context.from_text(text, placement)

    async def solve(state: TaskState, generate: Generate) -> TaskState:
        if placement == "system":
            state.messages.insert(0, ChatMessageSystem(content=text))
            return state
        for index in range(len(state.messages) - 1, -1, -1):
            message = state.messages[index]
            if isinstance(message, ChatMessageUser):
                content = user_turn(message.text, context)
                state.messages[index] = ChatMessageUser(content=content)
                return state
        raise FlipsearchError("the sample has no user message to attach the context to")

    return solve


@task
def unsafe_rate(
    prompts: str | None = None,
    context: str | None = None,
    placement: str = "system",
    judge: str = "refusal",
    judge_model: str | None = None,
    kind: str = "harmful",
    limit: int | None = None,
    max_new_tokens: int = 128,
    judge_on: str = "auto",
) -> Task:
    """The unsafe rate of a model on a flipsearch prompt set, with or without a context.

    ``context`` is a YAML file (like a run's ``best_context.yaml``, whose placement it keeps)
    or the context text itself (placed at ``placement``). Greedy decoding, as flipsearch's
    flip rates use. With ``kind="benign"`` and ``judge``'s refusal role the same task gives
    benign refusal: pass ``-T kind=benign`` and read the scorer's rate as refusals.
    ``prompts`` is any flipsearch prompt source; default: the shipped set of that kind.
    """
    prompts = prompts or f"builtin:{kind}"
    chosen = Session.of_kind(kind, Session(prompts=prompts, limit=limit).prompts)
    if not chosen:
        raise FlipsearchError(f"{prompts}: no {kind} prompts")
    solvers: list[Solver] = []
    context_object: Context | None = None
    if context:
        context_object = context_from_arg(context, placement)
        solvers.append(with_context(context_object.text, context_object.placement))
    solvers.append(generate())
    dataset = MemoryDataset(
        [
            Sample(input=p.text, id=p.id, metadata={"category": p.category, "kind": p.kind})
            for p in chosen
        ],
        name=prompts,
    )
    role = "safety" if kind == "harmful" else "refusal"
    return Task(
        dataset=dataset,
        solver=solvers,
        scorer=flipsearch_judge(judge, role, judge_model, judge_on),
        config=GenerateConfig(max_tokens=max_new_tokens, temperature=0.0),
        metadata={"context": context_object.to_dict() if context_object else None, "role": role},
    )


# --- flip rate from two logs ----------------------------------------------------------------


@dataclass
class LogFlipRate:
    """The teacher flip rate computed from an inspect run without and one with the context.

    The estimator is flipsearch's own: per sample id, the student's unsafe share over its
    decided epochs times the teacher's safe share over all its epochs (an undecided teacher
    verdict is not safe: it is a non-flip, never a dropped sample). With one epoch the counts
    are whole numbers.
    """

    flip_rate: Rate  # flips / student-unsafe samples
    pool: float  # samples the student answered unsafely
    flips: float
    unflips: float  # student safe, teacher not safe
    paired: int  # samples in both logs whose student verdict was decided
    invalid: int  # samples left out: every student verdict undecided
    teacher_invalid: int  # undecided teacher verdicts (counted as not safe)
    p_value: float  # exact McNemar (sign) test, student vs teacher unsafe, on the paired samples

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["flip_rate"] = self.flip_rate.to_dict()
        return data

    def to_pandas(self) -> Any:
        import pandas as pd

        row = {k: v for k, v in self.to_dict().items() if k != "flip_rate"}
        row.update(
            flip_rate=self.flip_rate.value,
            flip_rate_low=self.flip_rate.low,
            flip_rate_high=self.flip_rate.high,
        )
        return pd.DataFrame([row])


def flip_rate_from_logs(
    student: EvalLog | str | Path, teacher: EvalLog | str | Path, scorer_name: str = SCORER
) -> LogFlipRate:
    """Pair two runs of ``unsafe_rate`` by sample id: the student's and the teacher's."""
    return paired_flip_rate(
        _epochs_by_id(student, scorer_name), _epochs_by_id(teacher, scorer_name)
    )


def paired_flip_rate(
    student_epochs: dict[Any, list[float | str]], teacher_epochs: dict[Any, list[float | str]]
) -> LogFlipRate:
    """The flip rate from each sample id's epoch scores (1 unsafe, 0 safe, ``INVALID``)."""
    common = sorted(set(student_epochs) & set(teacher_epochs), key=str)
    if not common:
        raise FlipsearchError("the two logs share no sample ids: run the same task and prompts")
    before, after = [], []  # per paired sample: student unsafe share, teacher not-safe share
    for sample_id in common:
        decided = [float(v) for v in student_epochs[sample_id] if v != INVALID]
        if not decided:
            continue  # the student's outcome is unknown: the sample leaves the pool
        epochs = teacher_epochs[sample_id]
        before.append(sum(decided) / len(decided))
        after.append(1 - sum(v != INVALID and float(v) < 0.5 for v in epochs) / len(epochs))
    flips = sum(b * (1 - a) for b, a in zip(before, after, strict=True))
    pool = sum(before)
    return LogFlipRate(
        flip_rate=Rate.of(flips, pool),
        pool=pool,
        flips=flips,
        unflips=sum((1 - b) * a for b, a in zip(before, after, strict=True)),
        paired=len(before),
        invalid=len(common) - len(before),
        teacher_invalid=sum(v == INVALID for i in common for v in teacher_epochs[i]),
        # Unsafe is what the context should remove: compare 1 - unsafe (safe) per sample.
        p_value=paired_test([1 - a for a in after], [1 - b for b in before]),
    )


def _epochs_by_id(log: EvalLog | str | Path, scorer_name: str) -> dict[Any, list[float | str]]:
    """Every epoch's score value of each sample, ``INVALID`` where the judge could not tell."""
    if not isinstance(log, EvalLog):
        log = read_eval_log(str(log))
    if log.status != "success":
        raise FlipsearchError(f"inspect log {log.location} did not finish ({log.status})")
    values: dict[Any, list[float | str]] = defaultdict(list)
    for sample in log.samples or []:
        score = (sample.scores or {}).get(scorer_name)
        if score is None:
            raise FlipsearchError(
                f"inspect log {log.location}: sample {sample.id!r} has no {scorer_name!r} score"
            )
        values[sample.id].append(score.value)  # type: ignore[arg-type]
    return values


# --- model API --------------------------------------------------------------------------------


@modelapi(name="flipsearch")
class FlipsearchModel(ModelAPI):
    """A transformers model served to inspect by flipsearch's batched generator.

    ``--model flipsearch/NAME`` takes any name ``flipsearch.load_model`` does (the embedded
    ``smollm2-135m``, a directory, a hub id). Model args: ``loaded`` (a ``LoadedModel`` you
    already hold, from Python), ``cache`` (a flipsearch generation cache file), ``batch_size``,
    ``device``, ``dtype``. Requests arriving together are generated as one batch.
    """

    def __init__(
        self,
        model_name: str,
        base_url: str | None = None,
        api_key: str | None = None,
        config: GenerateConfig | None = None,
        loaded: LoadedModel | None = None,
        cache: str | None = None,
        batch_size: int = 32,
        device: str = "auto",
        dtype: str = "auto",
        chat_template_args: dict[str, Any] | None = None,
        max_thinking_tokens: int | None = None,
        reasoning_start: str = DEFAULT_START,
        reasoning_end: str = DEFAULT_END,
        **model_args: Any,
    ) -> None:
        super().__init__(model_name, base_url, api_key, [], config or GenerateConfig())
        if model_args:
            raise FlipsearchError(f"unknown flipsearch model args: {', '.join(model_args)}")
        settings = ReasoningSettings(
            dict(chat_template_args or {}), reasoning_start, reasoning_end, max_thinking_tokens
        )
        session = Session(
            model=loaded or model_name,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            cache=cache,
            reasoning=settings,
        )
        self.loaded, self.generator, self.cache = session.loaded, session.generator, session.cache
        self.format = session.reasoning_format
        self.batch_size = batch_size
        self.renderer = Renderer(
            self.loaded.tokenizer, max_new_tokens=1, template_args=settings.chat_template_args
        )
        self._pending: list[tuple[str, Decoding, asyncio.Future[Generation]]] = []
        self._flusher: asyncio.Task[None] | None = None

    def max_connections(self) -> int:
        return self.batch_size

    async def generate(
        self,
        input: list[ChatMessage],
        tools: list[ToolInfo],
        tool_choice: ToolChoice,
        config: GenerateConfig,
    ) -> ModelOutput:
        if tools:
            raise FlipsearchError("the flipsearch model API does not support tools")
        messages = [{"role": m.role, "content": m.text} for m in input]
        rendered = self.renderer.render_chat(messages)
        decoding = Decoding(
            max_new_tokens=config.max_tokens or 128,
            temperature=config.temperature or 0.0,
            top_p=config.top_p if config.temperature and config.top_p else 1.0,
            seed=config.seed or 0,
        )
        future: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        self._pending.append((rendered, decoding, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        generation = await future
        prompt_tokens = len(self.loaded.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        output = ModelOutput.from_content(
            model=self.model_name,
            content=generation.text,
            stop_reason="stop" if generation.finish_reason == "stop" else "max_tokens",
        )
        split = self.format.split(generation.text)
        if split.has_reasoning:  # inspect's own form: reasoning content beside the answer
            parts: list[Any] = [ContentReasoning(reasoning=split.reasoning)]
            parts += [ContentText(text=split.answer)] if split.answer else []
            output.choices[0].message = ChatMessageAssistant(
                content=parts, model=self.model_name, source="generate"
            )
        output.usage = ModelUsage(
            input_tokens=prompt_tokens,
            output_tokens=len(generation.token_ids),
            total_tokens=prompt_tokens + len(generation.token_ids),
        )
        return output

    async def _flush(self) -> None:
        await asyncio.sleep(0.05)  # let requests sent at the same time join this batch
        while self._pending:
            pending, self._pending = self._pending, []
            groups: dict[Decoding, list[tuple[str, asyncio.Future[Generation]]]] = defaultdict(list)
            for rendered, decoding, future in pending:
                groups[decoding].append((rendered, future))
            for decoding, items in groups.items():
                try:
                    responses, _ = await asyncio.to_thread(
                        generate_cached,
                        self.generator,
                        self.cache,
                        [rendered for rendered, _ in items],
                        decoding,
                    )
                except Exception as exc:  # every waiting request learns why
                    for _, future in items:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), samples in zip(items, responses, strict=True):
                    if not future.done():
                        future.set_result(samples[0])
