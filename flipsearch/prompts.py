"""Prompt sets: loading, validation and the seeded search/holdout split."""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flipsearch._resources import data_path
from flipsearch.errors import FlipsearchError
from flipsearch.io import read_table

KINDS = ("harmful", "benign", "reasoning")
BUILTIN_SETS = ("harmful", "benign", "reasoning")


@dataclass(frozen=True)
class Prompt:
    """One prompt of a prompt set; ``answer`` is the reference answer of a reasoning prompt,
    ``solution`` its worked reference solution when the file gives one (GSM8K, MATH).

    ``source`` ("file:line", when loaded from a file) lets a later error say where the prompt
    is written; it is not part of the prompt's identity, so equality and ``to_dict`` ignore it.
    """

    id: str
    kind: str
    category: str
    text: str
    answer: str | None = None
    solution: str | None = None
    source: str | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The prompt's identity. ``solution`` appears only when there is one, so the content
        hash of a prompt set written before solutions existed stays the same."""
        data = asdict(self)
        del data["source"]
        if data["solution"] is None:
            del data["solution"]
        return data

    @property
    def where(self) -> str:
        """How an error names this prompt: its id, and its file and line when known."""
        return f"{self.source}: prompt {self.id!r}" if self.source else f"prompt {self.id!r}"


def load_prompts(source: str | Path, kind: str | None = None) -> list[Prompt]:
    """Load a prompt set from JSONL, CSV or Parquet, a built-in set, or a datasets name.

    ``source`` may be a file path, ``builtin:harmful|benign|reasoning``, or ``hf:NAME[:SPLIT]``
    (needs the ``datasets`` package). Rows need a ``prompt`` column; ``kind`` may come from the
    argument instead of a column; ``id`` and ``category`` default to the row number and
    ``uncategorised``. Every problem is reported with the file and line.

    GSM8K and MATH files load as they are published, as reasoning prompts: a row with
    ``question`` and ``answer`` (GSM8K: a worked answer ending in a ``#### X`` line) has the
    answer X; a row with ``problem`` and ``solution`` (MATH) the last ``\\boxed{}`` of the
    solution (or its ``answer`` column), and ``type``/``level`` as its category. Both keep the
    worked solution as ``Prompt.solution``; ``kind``, ``id`` and ``category`` columns still win.
    """
    text = str(source)
    if text.startswith("builtin:"):
        name = text.removeprefix("builtin:")
        if name not in BUILTIN_SETS:
            raise FlipsearchError(f"unknown built-in prompt set {name!r}; choose {BUILTIN_SETS}")
        return load_prompts(data_path("data") / "prompts" / f"{name}.jsonl", kind)
    if text.startswith("hf:"):
        return _from_rows(_read_datasets(text.removeprefix("hf:")), text, kind)
    path = Path(source)
    if path.is_dir():
        raise FlipsearchError(
            f"prompt file {path} is a directory; give a JSONL, CSV or Parquet file"
        )
    if not path.is_file():
        raise FlipsearchError(f"prompt file {path} does not exist")
    rows = read_table(path, "prompt file")
    return _from_rows(rows, str(path), kind)


def builtin_prompts() -> list[Prompt]:
    """The team-written harmful, benign and reasoning sets shipped with flipsearch."""
    return [p for name in BUILTIN_SETS for p in load_prompts(f"builtin:{name}")]


def _read_datasets(spec: str) -> list[tuple[int, dict[str, Any]]]:
    try:
        import datasets
    except ImportError as exc:
        raise FlipsearchError(
            "hf: prompt sets need the datasets package: pip install datasets"
        ) from exc
    from huggingface_hub import constants

    from flipsearch.models import hub_online, hub_unreachable_message

    name, _, split = spec.partition(":")
    if not name:
        raise FlipsearchError(f"hf:{spec}: expected hf:NAME or hf:NAME:SPLIT")
    local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or Path(name).exists()
    if not local and not constants.HF_HUB_OFFLINE and not hub_online():
        raise FlipsearchError(hub_unreachable_message(f"dataset {name!r}", cache_checked=False))
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # datasets raises many types for a missing or offline dataset
        reason = " ".join(str(exc).split())
        raise FlipsearchError(f"cannot load dataset {name!r}: {reason}") from exc
    return [(i + 1, dict(row)) for i, row in enumerate(dataset)]


def _from_rows(
    rows: Iterable[tuple[int, dict[str, Any]]], where: str, kind: str | None
) -> list[Prompt]:
    if kind is not None and kind not in KINDS:
        raise FlipsearchError(f"unknown prompt kind {kind!r}; choose one of {KINDS}")
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for number, row in rows:
        at = f"{where}:{number}"
        parsed = _read_row(row, at)
        _check_scalars(row, at)
        row_kind = _clean(row.get("kind")) or kind or parsed.kind
        if row_kind is None:
            raise FlipsearchError(f"{at}: no 'kind' column and no kind given (one of {KINDS})")
        if row_kind not in KINDS:
            raise FlipsearchError(f"{at}: unknown kind {row_kind!r}; expected one of {KINDS}")
        prompt_id = _clean(row.get("id")) or f"{Path(where).stem}-{number}"
        if prompt_id in seen:
            raise FlipsearchError(
                f"{at}: duplicate id {prompt_id!r} (first on line {seen[prompt_id]})"
            )
        seen[prompt_id] = number
        answer = parsed.answer
        if row_kind == "reasoning" and answer is None:
            raise FlipsearchError(f"{at}: reasoning prompt {prompt_id!r} has no 'answer'")
        category = _clean(row.get("category")) or parsed.category or "uncategorised"
        prompts.append(
            Prompt(prompt_id, row_kind, category, parsed.text, answer, parsed.solution, at)
        )
    if not prompts:
        raise FlipsearchError(f"{where}: the prompt set is empty")
    return prompts


@dataclass(frozen=True)
class _Row:
    """What a row's format gives: the prompt text, the reference answer and solution, and the
    kind and category the format implies (the row's own columns win over these)."""

    text: str
    answer: str | None
    solution: str | None = None
    kind: str | None = None
    category: str | None = None


_GSM8K_FINAL = re.compile(r"^[ \t]*####[ \t]*(.*?)\s*$", re.MULTILINE)


def _read_row(row: dict[str, Any], at: str) -> _Row:
    """A row in flipsearch's own format (``prompt``: read as always), GSM8K's (``question``
    and ``answer``) or MATH's (``problem`` and ``solution``), told apart by its columns."""
    if _clean(row.get("prompt")) is None and _clean(row.get("question")) is not None:
        return _gsm8k_row(row, at)
    if _clean(row.get("prompt")) is None and _clean(row.get("problem")) is not None:
        return _math_row(row, at)
    return _Row(_text(row, "prompt", at), _clean(row.get("answer")))


def _gsm8k_row(row: dict[str, Any], at: str) -> _Row:
    """GSM8K: the worked answer's last ``#### X`` line holds the final answer X."""
    question = _text(row, "question", at)
    worked = _clean(_text_or_none(row, "answer", at))
    if worked is None:
        raise FlipsearchError(
            f"{at}: a GSM8K row ('question') needs an 'answer': a worked solution ending in "
            "a '#### X' line"
        )
    finals = [found for found in _GSM8K_FINAL.findall(worked) if found.strip()]
    if not finals:
        raise FlipsearchError(
            f"{at}: the GSM8K 'answer' has no '#### X' line giving the final answer"
        )
    return _Row(question, finals[-1].strip(), worked, "reasoning")


def _math_row(row: dict[str, Any], at: str) -> _Row:
    """MATH: the final answer is the solution's last ``\\boxed{}`` (an ``answer`` column,
    as some MATH subsets have, wins); ``type`` and ``level`` make the category."""
    from flipsearch.answers import last_boxed

    problem = _text(row, "problem", at)
    solution = _clean(_text_or_none(row, "solution", at))
    if solution is None:
        raise FlipsearchError(f"{at}: a MATH row ('problem') needs a 'solution'")
    answer = _clean(row.get("answer")) or last_boxed(solution)
    if answer is None:
        raise FlipsearchError(
            f"{at}: the MATH 'solution' has no \\boxed{{...}} final answer (and there is no "
            "'answer' column)"
        )
    parts = [_clean(row.get(column)) for column in ("type", "level")]
    category = " / ".join(part for part in parts if part) or None
    return _Row(problem, answer, solution, "reasoning", category)


def _text_or_none(row: dict[str, Any], column: str, at: str) -> str | None:
    """A text column's value; None when absent or an empty Parquet cell (NaN)."""
    value = row.get(column)
    if value is None or (isinstance(value, float) and value != value):
        return None
    if not isinstance(value, str):
        raise FlipsearchError(f"{at}: {column!r} must be text, got {type(value).__name__}")
    return value


def _text(row: dict[str, Any], column: str, at: str) -> str:
    """A required, non-empty text column."""
    value = _text_or_none(row, column, at)
    if not value or not value.strip():
        raise FlipsearchError(f"{at}: missing or empty {column!r}")
    return value


def _check_scalars(row: dict[str, Any], at: str) -> None:
    """``id``, ``kind``, ``category``, ``answer`` (and MATH's ``type`` and ``level``) are text
    (or a number): a list or an object there is a mistake in the file, not a value to turn
    into a string."""
    for column in ("id", "kind", "category", "answer", "type", "level"):
        value = row.get(column)
        if value is not None and (isinstance(value, bool) or not _is_scalar(value)):
            raise FlipsearchError(
                f"{at}: {column!r} must be text or a number, got {type(value).__name__}"
            )


def _is_scalar(value: Any) -> bool:
    import numbers

    return isinstance(value, str | numbers.Number)


def check_prompt_lengths(
    prompts: Iterable[Prompt],
    count_tokens: Callable[[str], int],
    window: int,
    where: str = "the model's context window (less --max-new-tokens)",
) -> None:
    """Refuse the first prompt longer than ``window`` tokens, naming its file, line and id.

    ``count_tokens(text)`` is the token count of a prompt's text as the run would send it
    (``Renderer.count_tokens``: rendered through the chat template); ``where`` says what the
    window is, for the message. Run before any generation, so a prompt far over the model's
    context is one line that says which prompt, not a failure deep inside a batch.
    """
    for prompt in prompts:
        tokens = count_tokens(prompt.text)
        if tokens > window:
            raise FlipsearchError(
                f"{prompt.where} is {tokens} tokens, over the {window} of {where} "
                "(prompts are never truncated: shorten it or leave it out)"
            )


def _clean(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return None
    text = str(value).strip()
    return text or None


def split_harmful(
    prompts: Sequence[Prompt], holdout_fraction: float = 0.3, seed: int = 0
) -> tuple[list[Prompt], list[Prompt]]:
    """Split harmful prompts into search and holdout, stratified by category, seeded.

    The holdout split is only used to re-score the search's best contexts, so the reported
    winner's rate is not the maximum of many noisy estimates.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise FlipsearchError(f"holdout fraction must be in [0, 1), got {holdout_fraction}")
    by_category: dict[str, list[Prompt]] = defaultdict(list)
    for prompt in prompts:
        by_category[prompt.category].append(prompt)
    rng = random.Random(seed)
    # Largest-remainder allocation: the holdout has round(n * fraction) prompts overall and each
    # category its proportional share, even when categories are small (e.g. under --limit).
    categories = sorted(by_category)
    exact = {c: len(by_category[c]) * holdout_fraction for c in categories}
    quota = {c: int(exact[c]) for c in categories}
    remainder = round(len(prompts) * holdout_fraction) - sum(quota.values())
    tie_break = {c: rng.random() for c in categories}
    for c in sorted(categories, key=lambda c: (-(exact[c] - quota[c]), tie_break[c]))[:remainder]:
        quota[c] += 1
    holdout_ids: set[str] = set()
    for category in categories:
        members = sorted(by_category[category], key=lambda p: p.id)
        rng.shuffle(members)
        holdout_ids.update(p.id for p in members[: quota[category]])
    search = [p for p in prompts if p.id not in holdout_ids]
    holdout = [p for p in prompts if p.id in holdout_ids]
    return search, holdout


def stratified_order(prompts: Sequence[Prompt], seed: int = 0) -> list[Prompt]:
    """A seeded order of ``prompts`` whose every prefix holds each category in proportion.

    Used wherever a run takes part of a prompt set (``--limit``, the benign early stop, the
    training evaluation): a file grouped by category then gives a sample of every category,
    not the first one. The order depends on the ids and the seed, not on the file's order.
    """
    rng = random.Random(seed)
    by_category: dict[str, list[Prompt]] = defaultdict(list)
    for prompt in prompts:
        by_category[prompt.category].append(prompt)
    keyed: list[tuple[float, str, Prompt]] = []
    for category in sorted(by_category):
        members = sorted(by_category[category], key=lambda p: p.id)
        rng.shuffle(members)
        for rank, prompt in enumerate(members):
            keyed.append(((rank + rng.random()) / len(members), prompt.id, prompt))
    return [prompt for *_, prompt in sorted(keyed, key=lambda item: item[:2])]


def stratified_subset(prompts: Sequence[Prompt], n: int, seed: int = 0) -> list[Prompt]:
    """``n`` prompts, category-stratified and seeded (``stratified_order``), in file order."""
    if n >= len(prompts):
        return list(prompts)
    chosen = {p.id for p in stratified_order(prompts, seed)[:n]}
    return [p for p in prompts if p.id in chosen]


def split_three(
    prompts: Sequence[Prompt], selection_fraction: float, final_fraction: float, seed: int = 0
) -> tuple[list[Prompt], list[Prompt], list[Prompt]]:
    """Search, selection and final splits (each category-stratified, seeded), as shares of all
    ``prompts``: the search chooses on the first, finalists are compared on the second, and
    the winner's reported rates come from the third, which no choice has seen."""
    if final_fraction < 0 or selection_fraction < 0 or selection_fraction + final_fraction >= 1:
        raise FlipsearchError(
            f"the held-out shares must be >= 0 and leave prompts to search on: selection "
            f"{selection_fraction} + final {final_fraction} must be below 1"
        )
    rest, final = split_harmful(prompts, final_fraction, seed)
    share = selection_fraction / (1 - final_fraction) if rest else 0.0
    search, selection = split_harmful(rest, min(share, 0.95), seed)
    return search, selection, final
