"""The judges' contract: a ``Verdict`` for each (prompt, response), in one batched call.

Two roles: the *safety judge* says whether an answer to a harmful prompt is unsafe; the
*refusal judge* says whether an answer to a benign prompt is a refusal. A verdict that cannot be
made is ``invalid`` and is counted, never read as safe. A judge says which roles it can serve
in ``roles`` (both, when it does not say).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from flipsearch.errors import FlipsearchError

ROLES = ("safety", "refusal")
# What a judge reads of a reasoning model's response: the answer, the full response, or both
# parts apart (``either``: unsafe if either part is). Judges say which they can read in
# ``scopes`` and which they read by default in ``default_scope``.
SCOPES = ("answer", "full", "either")


@dataclass(frozen=True)
class Verdict:
    """A judge's view of one response. ``score`` is P(unsafe) in [0, 1]."""

    unsafe: bool | None
    score: float | None
    refusal: bool | None = None
    categories: tuple[str, ...] = field(default_factory=tuple)
    invalid: bool = False
    reason: str = ""
    # The answer never came (a reasoning model's block never closed, or nothing followed it):
    # a state of its own, counted apart from a judge's invalid output, and like it never safe.
    unfinished: bool = False
    # P(refusal) when the judge measures it (WildGuard); else ``1 - score`` stands in.
    refusal_score: float | None = None

    @classmethod
    def invalid_because(cls, reason: str) -> Verdict:
        return cls(unsafe=None, score=None, refusal=None, invalid=True, reason=reason)

    @classmethod
    def unfinished_answer(cls, reason: str = "the answer never came") -> Verdict:
        """No answer to judge: undecided like ``invalid`` (never safe), counted apart."""
        return cls(None, None, None, invalid=True, reason=reason, unfinished=True)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["categories"] = list(self.categories)
        return data


class Judge(Protocol):
    """Anything that turns (prompt, response) pairs into verdicts, in one batched call."""

    name: str

    def judge(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]: ...


JudgeSpec = str | Judge | Callable[[str, str], Any]
"""A judge name (see ``get_judge``), a ``Judge`` object, or a ``(prompt, response)`` callable."""


def check_role(role: str) -> None:
    if role not in ROLES:
        raise FlipsearchError(f"unknown judge role {role!r}; choose safety or refusal")


def judge_roles(judge: Any) -> tuple[str, ...]:
    return tuple(getattr(judge, "roles", ROLES))


def judge_scopes(judge: Any) -> tuple[str, ...]:
    """The scopes a judge can read (all, when it does not say)."""
    return tuple(getattr(judge, "scopes", SCOPES))


def resolve_scope(judge: Any, requested: str = "auto") -> str:
    """The scope a safety judge reads: ``requested``, or with ``auto`` the judge's own default
    (``answer`` for a judge that does not say: it was written for answers)."""
    scopes = judge_scopes(judge)
    name = getattr(judge, "name", type(judge).__name__)
    if requested == "auto":
        chosen = str(getattr(judge, "default_scope", "answer"))
        return chosen if chosen in scopes else scopes[0]
    if requested not in SCOPES:
        raise FlipsearchError(f"--judge-on must be auto, {', '.join(SCOPES)}; got {requested!r}")
    if requested not in scopes:
        why = getattr(judge, "scope_note", "")
        raise FlipsearchError(
            f"--judge-on {requested}: judge {name!r} reads only {' or '.join(scopes)}{why}"
        )
    return requested


class JudgeFactory(Protocol):
    """What a judge module's ``make`` looks like (the registry in ``__init__`` calls it).

    ``argument`` is what followed ``NAME:`` (may be empty); ``judge_model`` the weights named
    by ``--judge-model``; ``build(name)`` makes another judge for the same role (ensembles).
    """

    def __call__(
        self,
        argument: str,
        role: str,
        *,
        judge_model: str | None,
        build: Callable[[str], Judge],
        **options: Any,
    ) -> Judge: ...


def greedy_with_logits(
    loaded: Any, texts: list[str], max_new_tokens: int, add_special_tokens: bool
) -> tuple[list[list[int]], Any]:
    """Greedy generation as the model judges (Llama Guard, WildGuard) read their verdicts:
    batched and left-padded; the generated ids of each text, and every step's logits (a
    tuple of (B, V))."""
    import torch

    tokenizer, model = loaded.tokenizer, loaded.model
    tokenizer.padding_side = "left"
    encoded = tokenizer(
        texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
    ).to(model.device)
    with torch.inference_mode():
        output = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    generated = output.sequences[:, encoded["input_ids"].shape[1] :].tolist()
    return generated, output.logits


def in_batches(
    pairs: Sequence[tuple[str, str]],
    batch_size: int,
    render: Callable[[str, str], str],
    judge_batch: Callable[[list[str]], list[Verdict]],
) -> list[Verdict]:
    """A model judge's verdicts, ``batch_size`` rendered pairs per model call."""
    verdicts: list[Verdict] = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        verdicts.extend(judge_batch([render(p, r) for p, r in batch]))
    return verdicts
