"""Reasoning models: a response split into its reasoning and its answer, and the thinking budget.

A reasoning model (DeepSeek-R1-Distill, Qwen3, ...) writes a trace between two markers
(``<think>`` and ``</think>`` by default), then its answer. Some chat templates open the block
in the generation prompt themselves (the model's text then starts inside it), some leave it to
the model, and a model may skip it. ``ReasoningFormat.split`` handles all three; a response
whose block never closed, or that closed with nothing after it, has no answer: it is
*unfinished*, a state of its own that is never read as safe.

Budget forcing (``BudgetForcedGenerator``): the reasoning gets at most ``max_thinking_tokens``
tokens; when they run out, the block is closed for the model (the end marker and a blank line
are appended) and the model writes its answer, which gets ``max_new_tokens`` tokens of its own.
It wraps any backend that can continue token-id prompts (``generate_ids``), so hf, vllm and
openai force budgets the same way: phase one generates the reasoning, phase two the answer
after the closed block. A model that closes its reasoning itself within the budget goes on
into its answer in phase one, and phase two only tops the answer up to its length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from flipsearch.backends._base import Decoding, Generation, request_seed
from flipsearch.errors import FlipsearchError

DEFAULT_START, DEFAULT_END = "<think>", "</think>"
_PROBE = "Flipsearch probe message 7x3q."
# apply_chat_template's own parameters: not template arguments.
_TEMPLATE_CALL_ARGS = frozenset(
    {
        "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
        "continue_final_message", "tokenize", "padding", "truncation", "max_length",
        "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    }
)  # fmt: skip


@dataclass(frozen=True)
class ReasoningSettings:
    """How a run treats reasoning: template arguments, markers and the thinking budget."""

    chat_template_args: dict[str, Any] = field(default_factory=dict)
    start: str = DEFAULT_START
    end: str = DEFAULT_END
    max_thinking_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.start.strip() or not self.end.strip():
            raise FlipsearchError("--reasoning-start and --reasoning-end must not be empty")
        if self.start == self.end:
            raise FlipsearchError("--reasoning-start and --reasoning-end must differ")
        if self.max_thinking_tokens is not None and self.max_thinking_tokens < 1:
            raise FlipsearchError("--max-thinking-tokens must be at least 1")
        taken = sorted(set(self.chat_template_args) & _TEMPLATE_CALL_ARGS)
        if taken:
            raise FlipsearchError(
                f"--chat-template-arg {taken[0]}: flipsearch sets that itself; give the "
                "template's own arguments (e.g. enable_thinking=false)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "chat_template_args": dict(self.chat_template_args),
            "reasoning_start": self.start,
            "reasoning_end": self.end,
            "max_thinking_tokens": self.max_thinking_tokens,
        }


@dataclass(frozen=True)
class ReasoningSplit:
    """One response's parts. ``answer`` is "" when it never came; ``closed`` says whether the
    reasoning block was closed (True when there was none)."""

    reasoning: str
    answer: str
    has_reasoning: bool
    closed: bool

    @property
    def unfinished(self) -> bool:
        """The answer never came: the block stayed open, or nothing followed it."""
        return not self.closed or (self.has_reasoning and not self.answer.strip())

    def to_dict(self) -> dict[str, Any]:
        return {
            "reasoning": self.reasoning,
            "answer": self.answer,
            "has_reasoning": self.has_reasoning,
            "reasoning_finished": self.closed,
            "unfinished": self.unfinished,
        }


NO_REASONING = ReasoningSplit("", "", False, True)


@dataclass(frozen=True)
class ReasoningFormat:
    """The markers, and whether the chat template's generation prompt opens the block."""

    start: str = DEFAULT_START
    end: str = DEFAULT_END
    opened_by_template: bool = False

    def split(self, text: str) -> ReasoningSplit:
        """Reasoning and answer of a response's text (as decoded, markers included)."""
        body = text
        if not self.opened_by_template:
            stripped = text.lstrip()
            if stripped.startswith(self.start):
                body = stripped[len(self.start) :]
            elif self.end not in text:  # the model skipped the block: all of it is answer
                return ReasoningSplit("", text.strip(), False, True)
            # An end marker without a start: the block was opened where the text does not
            # show it (a template that opens it, seen through another rendering).
        cut = body.find(self.end)
        if cut < 0:
            return ReasoningSplit(body.strip(), "", True, False)
        return ReasoningSplit(body[:cut].strip(), body[cut + len(self.end) :].strip(), True, True)

    def reasoning_tokens(self, tokenizer: Any, token_ids: Sequence[int]) -> int:
        """How many leading response tokens are reasoning, the end marker included (0 when
        the response has no reasoning block, all of them when it never closed)."""
        ids = list(token_ids)
        split = self.split(tokenizer.decode(ids, skip_special_tokens=True))
        if not split.has_reasoning:
            return 0
        if not split.closed:
            return len(ids)
        low, high = 1, len(ids)  # the shortest prefix whose text holds the end marker
        while low < high:
            middle = (low + high) // 2
            prefix = self.split(tokenizer.decode(ids[:middle], skip_special_tokens=True))
            if prefix.has_reasoning and prefix.closed:
                high = middle
            else:
                low = middle + 1
        return low


def template_opens_reasoning(
    tokenizer: Any, start: str, end: str, template_args: dict[str, Any] | None = None
) -> bool:
    """Whether the chat template's generation prompt leaves a reasoning block open (the
    model's text then starts inside it). Read from a rendered probe: what follows the user
    turn holds a start marker after its last end marker."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    rendered: str = tokenizer.apply_chat_template(
        [{"role": "user", "content": _PROBE}],
        tokenize=False,
        add_generation_prompt=True,
        **(template_args or {}),
    )
    tail = rendered[rendered.rfind(_PROBE) + len(_PROBE) :]
    return tail.rfind(start) > tail.rfind(end)


def detect_format(tokenizer: Any, settings: ReasoningSettings) -> ReasoningFormat:
    opened = template_opens_reasoning(
        tokenizer, settings.start, settings.end, settings.chat_template_args
    )
    return ReasoningFormat(settings.start, settings.end, opened)


def check_template_args(tokenizer: Any, template_args: dict[str, Any]) -> list[str]:
    """The template arguments that change nothing in the rendering (a typo, or a template
    that does not read them): for a warning, since a silent no-op would mislead."""
    if not template_args or not getattr(tokenizer, "chat_template", None):
        return []
    chat = [{"role": "user", "content": _PROBE}]

    def render(**args: Any) -> str:
        text: str = tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True, **args
        )
        return text

    plain = render()
    return [key for key, value in template_args.items() if render(**{key: value}) == plain]


# ---------------------------------------------------------------------------------------------
# Budget forcing


class ContinuingGenerator(Protocol):
    """A backend that can continue token-id prompts, one sample per row."""

    fingerprint: str
    mode: str

    def generate_ids(
        self,
        rows: Sequence[Sequence[int]],
        decoding: Decoding,
        seeds: Sequence[int],
        max_tokens: Sequence[int],
    ) -> list[Generation]: ...


@dataclass
class _Pending:
    """What phase one left for a row: the tokens so far and the answer tokens still owed."""

    prefix: list[int]
    remaining: int
    done: Generation | None = None


class BudgetForcedGenerator:
    """A generator whose reasoning never exceeds ``budget`` tokens (see the module doc)."""

    def __init__(
        self, inner: Any, tokenizer: Any, fmt: ReasoningFormat, budget: int, chunk: int = 64
    ) -> None:
        if not hasattr(inner, "generate_ids"):
            raise FlipsearchError(
                f"--max-thinking-tokens: this backend ({type(inner).__name__}) cannot continue a "
                "response, so it cannot force a thinking budget"
            )
        self.inner, self.tokenizer, self.format, self.budget = inner, tokenizer, fmt, budget
        self.chunk = max(1, chunk)
        self.close_ids = list(tokenizer(fmt.end + "\n\n", add_special_tokens=False)["input_ids"])
        self.fingerprint = f"{inner.fingerprint}:think-budget={budget}:{fmt.end!r}"
        self.mode = f"{inner.mode}; reasoning forced closed after {budget} tokens"

    def generate_batches(
        self, prompts: Sequence[str], decoding: Decoding
    ) -> Iterator[tuple[list[int], list[list[Generation]]]]:
        if not prompts:
            return
        encoded = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        n = decoding.samples
        for start in range(0, len(prompts), max(1, self.chunk // n)):
            indices = list(range(start, min(start + max(1, self.chunk // n), len(prompts))))
            rows = [list(encoded[i]) for i in indices for _ in range(n)]
            seeds = [  # per prompt and sample; 31 bits, which every server accepts
                (request_seed(decoding.seed, prompts[i]) * 1_000_003 + k) & 0x7FFFFFFF
                for i in indices
                for k in range(n)
            ]
            results = self.force(rows, decoding, seeds)
            yield indices, [results[r * n : (r + 1) * n] for r in range(len(indices))]

    def force(
        self, rows: list[list[int]], decoding: Decoding, seeds: list[int]
    ) -> list[Generation]:
        """Phase one (reasoning, at most ``budget`` tokens), then phase two (the answer)."""
        single = replace(decoding, samples=1)
        first = self.inner.generate_ids(rows, single, seeds, [self.budget] * len(rows))
        pending = [self._after_thinking(g, decoding.max_new_tokens) for g in first]
        todo = [i for i, p in enumerate(pending) if p.done is None]
        if todo:
            second = self.inner.generate_ids(
                [rows[i] + pending[i].prefix for i in todo],
                single,
                [(seeds[i] * 31 + 7) & 0x7FFFFFFF for i in todo],
                [pending[i].remaining for i in todo],
            )
            for i, generation in zip(todo, second, strict=True):
                ids = pending[i].prefix + list(generation.token_ids)
                text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
                pending[i].done = Generation(
                    text, tuple(ids), generation.finish_reason, generation.stop_token
                )
        return [p.done for p in pending if p.done is not None]

    def _after_thinking(self, first: Generation, answer_budget: int) -> _Pending:
        ids = list(first.token_ids)
        split = self.format.split(first.text)
        if split.has_reasoning and not split.closed:  # out of budget (or stopped inside)
            return _Pending(ids + self.close_ids, answer_budget)
        thought = self.format.reasoning_tokens(self.tokenizer, ids) if split.has_reasoning else 0
        answer = len(ids) - thought
        if answer >= answer_budget:  # the answer already has its length: cut it there
            kept = ids[: thought + answer_budget]
            text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
            finish = (
                "length"
                if answer > answer_budget or first.finish_reason == "length"
                else first.finish_reason
            )
            return _Pending(
                kept,
                0,
                Generation(
                    text, tuple(kept), finish, first.stop_token if finish == "stop" else None
                ),
            )
        if first.finish_reason == "stop":
            return _Pending(ids, 0, first)
        return _Pending(ids, answer_budget - answer)


def with_budget(
    generator: Any, tokenizer: Any, settings: ReasoningSettings | None, chunk: int = 64
) -> Any:
    """``generator`` itself, or wrapped in budget forcing when the settings give a budget."""
    if settings is None or settings.max_thinking_tokens is None:
        return generator
    if isinstance(generator, BudgetForcedGenerator):
        return generator
    fmt = detect_format(tokenizer, settings)
    return BudgetForcedGenerator(
        generator, tokenizer, fmt, settings.max_thinking_tokens, max(chunk, 64)
    )


def reasoning_window(
    decoding_tokens: int, settings: ReasoningSettings | None, tokenizer: Any
) -> int:
    """Response tokens a prompt must leave room for: the answer, and with a thinking budget
    the reasoning and the forced close too."""
    if settings is None or settings.max_thinking_tokens is None:
        return decoding_tokens
    close = len(tokenizer(settings.end + "\n\n", add_special_tokens=False)["input_ids"])
    return decoding_tokens + settings.max_thinking_tokens + close
