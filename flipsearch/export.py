"""Hand-off to a distributed trainer: TRL's self-distillation (SDFT) dataset format.

TRL's trainer builds its teacher prompt by rewriting the last user turn as
``"{prompt}\\n\\n{privileged_context}"``, which is flipsearch's ``user_suffix`` placement
(``contexts.build_messages``). A context the search measured at another placement would be
conditioned differently there, so exporting one is refused unless forced.

What else decides the prompt TRL renders travels in the ``.meta.json``: the chat template's
arguments (``SDFTConfig.chat_template_kwargs``), the reasoning markers and the thinking budget
(TRL does not force one, so its ``max_completion_length`` must cover it). TRL also keeps only
the last ``max_prompt_length`` tokens (512 by default) of a prompt; given the model, every
teacher prompt is rendered as TRL renders it and counted, and a cut that would reach into the
privileged context is refused: the teacher would be trained on a context it never saw whole.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flipsearch.contexts import Context, Renderer, build_messages, context_from_arg
from flipsearch.errors import FlipsearchError, FlipsearchWarning
from flipsearch.io import prepare_out_file, write_atomic
from flipsearch.reasoning import ReasoningSettings
from flipsearch.session import Session

TRL_PLACEMENT = "user_suffix"
TRL_TEACHER_TEMPLATE = "{prompt}\n\n{privileged_context}"  # SDFTConfig.teacher_prompt_template
TRL_MAX_PROMPT_LENGTH = 512  # SDFTConfig.max_prompt_length's default
LENGTH_CHECK_SKIPPED = "skipped: no --model"


@dataclasses.dataclass(frozen=True)
class TeacherPromptLength:
    """One row's teacher prompt as TRL tokenizes it: its length, and how many of its tokens
    come before the context's first token (a cut of more than that damages the context)."""

    id: str
    tokens: int
    before_context: int


def export_trl_sdft(
    context_arg: str,
    prompt_sources: list[str],
    limit: int | None,
    out: str | Path,
    force: bool = False,
    reasoning: ReasoningSettings | None = None,
    model: str | None = None,
    max_prompt_length: int = TRL_MAX_PROMPT_LENGTH,
) -> int:
    """Write ``prompt`` (a chat) + ``privileged_context`` rows; returns how many.

    ``model`` (its tokenizer only) turns on the check against TRL's ``max_prompt_length``;
    ``reasoning`` is recorded for the trainer and its template arguments shape that check.
    """
    out = prepare_out_file(Path(out), "dataset file")  # before any prompt is read
    if max_prompt_length < 1:
        raise FlipsearchError("--max-prompt-length must be at least 1")
    settings = reasoning if reasoning is not None else ReasoningSettings()
    context = _exported_context(context_arg, force)
    if model is not None:
        from flipsearch.models import check_model

        check_model(model, "--model")  # a wrong name fails before the prompts are read
    harmful = Session(prompts=prompt_sources, limit=limit).harmful  # no model is loaded
    if not harmful:
        raise FlipsearchError("nothing to export: the prompt sets have no harmful prompts")
    rows = [(p.id, p.text) for p in harmful]
    check: str | dict[str, Any] = LENGTH_CHECK_SKIPPED
    if model is not None:
        check = check_teacher_lengths(model, rows, context, settings, max_prompt_length)
    lines = [
        json.dumps(
            {
                "prompt": [{"role": "user", "content": text}],
                "privileged_context": context.text,
                "id": row_id,
            },
            ensure_ascii=False,
        )
        for row_id, text in rows
    ]
    write_atomic(out, "\n".join(lines) + "\n")
    meta = _meta(context, len(lines), settings, max_prompt_length, check)
    write_atomic(out.with_suffix(".meta.json"), json.dumps(meta, indent=2, ensure_ascii=False))
    return len(lines)


def _exported_context(context_arg: str, force: bool) -> Context:
    """The context, refused when it was measured at a placement TRL's teacher does not use."""
    context = context_from_arg(context_arg, TRL_PLACEMENT)
    if context.placement != TRL_PLACEMENT and not force:
        raise FlipsearchError(
            f"context {context.id!r} was measured at placement {context.placement!r}, but TRL's "
            f"self-distillation teacher uses {TRL_PLACEMENT!r}; search with that placement, or "
            "pass --force to export anyway"
        )
    return context


def check_teacher_lengths(
    model: str,
    rows: Sequence[tuple[str, str]],
    context: Context,
    settings: ReasoningSettings,
    max_prompt_length: int,
) -> dict[str, Any]:
    """Refuse rows whose left cut would reach the context; warn about rows cut before it.

    Returns what the ``.meta.json`` records of the check.
    """
    from flipsearch.models import load_model

    tokenizer = load_model(model, weights=False).tokenizer
    renderer = Renderer(tokenizer, 0, template_args=settings.chat_template_args)
    # TRL puts the context at user_suffix whatever placement it was measured at (--force).
    teacher = dataclasses.replace(context, placement=TRL_PLACEMENT)
    measured = [measure_teacher_prompt(renderer, row_id, text, teacher) for row_id, text in rows]
    longest = max(m.tokens for m in measured)
    over = [m for m in measured if m.tokens > max_prompt_length]
    broken = [m for m in over if m.tokens - max_prompt_length > m.before_context]
    if broken:
        first = broken[0]
        keep = max(m.tokens - m.before_context for m in measured)
        raise FlipsearchError(
            f"{len(broken)} of {len(rows)} rows: TRL keeps the last {max_prompt_length} tokens "
            f"of a prompt (max_prompt_length), which would cut into the privileged context "
            f"(first: row {first.id!r}, teacher prompt {first.tokens} tokens, the context "
            f"starts after token {first.before_context}); raise max_prompt_length in TRL's "
            f"SDFTConfig and --max-prompt-length here to at least {keep} ({longest} cuts "
            "nothing), or shorten the context"
        )
    if over:
        warnings.warn(
            f"{len(over)} of {len(rows)} rows have a teacher prompt over TRL's max_prompt_length "
            f"of {max_prompt_length} tokens (longest {longest}): TRL will cut the start of the "
            f"student's request (the context survives); raise max_prompt_length to {longest} "
            "to keep them whole",
            FlipsearchWarning,
            stacklevel=2,
        )
    return {
        "model": model,
        "longest_teacher_prompt_tokens": longest,
        "rows_cut": len(over),
        "rows": len(rows),
    }


def measure_teacher_prompt(
    renderer: Renderer, row_id: str, prompt: str, context: Context
) -> TeacherPromptLength:
    """One row's teacher prompt rendered as TRL renders it: the chat template with its
    arguments and the generation prompt, the context joined to the last user turn."""
    text = str(renderer.render_chat(build_messages(prompt, context)))
    # The last occurrence: only the end of the turn and the generation prompt follow it.
    char_start = text.rfind(context.text)
    if char_start < 0:
        raise FlipsearchError(
            f"context {context.id!r}: the chat template dropped or altered it at placement "
            f"{TRL_PLACEMENT!r}, where TRL's teacher puts it"
        )
    tokens, before = _tokens_before(renderer.tokenizer, text, char_start)
    return TeacherPromptLength(row_id, tokens, before)


def _tokens_before(tokenizer: Any, text: str, char_start: int) -> tuple[int, int]:
    """The tokens of ``text`` (as TRL tokenizes it: no special tokens added) and how many of
    them end before character ``char_start``.

    Read from the tokenizer's own character offsets (``return_offsets_mapping``), not from
    counting a prefix's tokens: a token that merges the separator with the context's first
    characters belongs to the context here (cutting it damages the context), while a prefix
    tokenized alone would split it and count one token too many. Slow tokenizers have no
    offsets; for them the prefix count less one is used, erring toward a refusal.
    """
    options = {"add_special_tokens": False, "verbose": False}
    try:
        encoded = tokenizer(text, return_offsets_mapping=True, **options)
    except NotImplementedError:  # a slow (Python) tokenizer
        total = len(tokenizer(text, **options)["input_ids"])
        prefix = len(tokenizer(text[:char_start], **options)["input_ids"])
        return total, max(prefix - 1, 0)
    spans = encoded["offset_mapping"]
    first = next((i for i, (_, end) in enumerate(spans) if end > char_start), len(spans))
    return len(encoded["input_ids"]), first


def _meta(
    context: Context,
    rows: int,
    settings: ReasoningSettings,
    max_prompt_length: int,
    check: str | dict[str, Any],
) -> dict[str, Any]:
    """The dataset's record: the context, the settings TRL needs, and the length check."""
    budget = settings.max_thinking_tokens
    completion = (
        f"TRL does not force a thinking budget: set max_completion_length to at least "
        f"{budget} (max_thinking_tokens) plus the answer's tokens, or completions stop inside "
        f"the reasoning ({settings.start} ... {settings.end})"
        if budget is not None
        else "max_completion_length must cover the reasoning (if the model reasons) plus the answer"
    )
    return {
        "context": context.to_dict(),
        "teacher_placement": TRL_PLACEMENT,
        "teacher_template": "last user turn = '{prompt}\\n\\n{privileged_context}'",
        "rows": rows,
        "reasoning": settings.to_dict(),
        "max_prompt_length": max_prompt_length,
        "length_check": check,
        "trl_config": {
            "chat_template_kwargs": dict(settings.chat_template_args),
            "max_prompt_length": max_prompt_length,
            "teacher_prompt_template": TRL_TEACHER_TEMPLATE,
        },
        "trl_notes": {
            "chat_template_kwargs": "pass to SDFTConfig(chat_template_kwargs=...): TRL forwards "
            "them to the tokenizer's apply_chat_template for student and teacher prompts; "
            "without them it renders other prompts than the ones measured",
            "max_prompt_length": "TRL keeps the last max_prompt_length tokens of a prompt (cut "
            "from the left); set SDFTConfig(max_prompt_length=...) to the value checked here",
            "max_completion_length": completion,
        },
    }
