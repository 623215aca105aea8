"""The leaderboard: typed rows, the one ranking rule, the winner, and the table.

A ``Row`` is one context as the search measured it (complete, or pruned with partial counts).
It is stored with its Optuna trial as JSON (``to_dict``) and read back (``from_dict``), and it
reads like the leaderboard's table row (``row["flip_rate"]``), so tables, reports and tests
see the same columns the CSV has.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flipsearch.contexts import Context
from flipsearch.fliprate import ContextScore, Judged, Rate, compare, paired_test

if TYPE_CHECKING:
    import pandas as pd

RATES = ("flip_rate", "absolute_flip_rate", "unflip_rate", "benign_refusal")


def measured(value: float | None) -> float | None:
    """``value`` unless it is missing or NaN (a rate over nothing)."""
    return None if value is None or value != value else value


@dataclass(eq=False)
class Row(Mapping[str, Any]):
    """One context's measurements on the search split."""

    context: Context
    state: str  # complete | pruned
    outcomes: dict[str, float]  # per-prompt flips on the student-unsafe pool (paired tests)
    rates: dict[str, Rate]  # flip_rate always; the others when measured
    # measured | stopped (surely over the limit) | within (stopped: surely within it)
    # | not needed | partial (pruned) | none
    benign: str = "none"
    invalid: int | None = None
    unfinished: int | None = None  # teacher answers that never came (reasoning models)
    trial: int | None = None
    source: str | None = None  # seed | grammar | proposer
    teacher_generations: int | None = None
    pareto: bool | None = None
    pruned_by: str | None = None  # which rule stopped a pruned trial, in words
    _flat: dict[str, Any] | None = field(default=None, init=False, repr=False)

    @classmethod
    def of_score(
        cls, score: ContextScore, state: str = "complete", benign: str = "measured"
    ) -> Row:
        """A fully scored context. ``benign`` says how far its benign refusal was measured."""
        return cls(
            score.context,
            state,
            score.flip_outcomes(),
            {name: getattr(score, name) for name in RATES},
            benign=benign if score.benign or benign != "measured" else "none",
            invalid=score.invalid,
            unfinished=score.unfinished,
        )

    @classmethod
    def pruned(
        cls,
        context: Context,
        outcomes: dict[str, float],
        pool: float,
        benign: Sequence[Judged] = (),
        benign_state: str = "partial",
    ) -> Row:
        """A context stopped by the pruner: its flips on the prompts it was scored on, and its
        refusals on the benign prompts it had been measured on (a context that led), ``stopped``
        when that is what stopped it."""
        rates = {"flip_rate": Rate.of(sum(outcomes.values()), pool)}
        if benign:
            rates["benign_refusal"] = Rate.of(sum(j.refusal_share for j in benign), len(benign))
        return cls(context, "pruned", outcomes, rates, benign=benign_state if benign else "none")

    @property
    def flip_rate(self) -> float | None:
        return measured(self.rates["flip_rate"].value)

    @property
    def benign_refusal(self) -> float | None:
        rate = self.rates.get("benign_refusal")
        return measured(rate.value) if rate is not None else None

    def feasible(self, max_benign_refusal: float) -> bool:
        """Within the benign-refusal limit; an unmeasured refusal does not count against it."""
        refusal = self.benign_refusal
        return refusal is None or refusal <= max_benign_refusal

    def rank_key(self, max_benign_refusal: float) -> tuple[bool, bool, float, float]:
        """Complete and feasible first, then by flip rate, then by lower benign refusal;
        an unmeasured flip rate sorts last."""
        flip, refusal = self.flip_rate, self.benign_refusal
        return (
            self.state != "complete",
            not self.feasible(max_benign_refusal),
            -(flip if flip is not None else -1.0),
            refusal if refusal is not None else 0.0,
        )

    # -- as a table row and as JSON ------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The flat, JSON-safe columns (NaN as None), as stored with the trial."""
        if self._flat is None:
            data: dict[str, Any] = {
                "context": self.context.id,
                "family": self.context.family,
                "placement": self.context.placement,
                "text": self.context.text,
                "tags": list(self.context.tags),
                "state": self.state,
                "outcomes": dict(self.outcomes),
            }
            for name, rate in self.rates.items():
                data.update(rate.columns(name))
            if self.state == "complete":
                data.update(benign=self.benign, invalid=self.invalid, unfinished=self.unfinished)
            else:
                data.update(pruned_by=self.pruned_by)
                if self.benign != "none":
                    data.update(benign=self.benign)
            for name in ("trial", "source", "teacher_generations", "pareto"):
                data[name] = getattr(self, name)
            self._flat = {k: _json_safe(v) for k, v in data.items()}
        return self._flat

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Row:
        context = Context.from_dict({**data, "id": data["context"]}, f"row {data['context']!r}")
        rates = {
            name: Rate(
                float(data[f"{name}_count"]),
                float(data[f"{name}_n"]),
                float(data[f"{name}_low"]),
                float(data[f"{name}_high"]),
            )
            for name in RATES
            if data.get(f"{name}_n") is not None
        }
        return cls(
            context,
            str(data["state"]),
            {str(k): float(v) for k, v in (data.get("outcomes") or {}).items()},
            rates,
            benign=str(data.get("benign") or "none"),
            invalid=data.get("invalid"),
            unfinished=data.get("unfinished"),
            trial=data.get("trial"),
            source=data.get("source"),
            teacher_generations=data.get("teacher_generations"),
            pareto=data.get("pareto"),
            pruned_by=data.get("pruned_by"),
        )

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def rank(rows: Sequence[Row], max_benign_refusal: float) -> list[Row]:
    """The one ranking rule (``Row.rank_key``); ties keep their order."""
    return sorted(rows, key=lambda row: row.rank_key(max_benign_refusal))


def rank_scores(scores: Sequence[ContextScore], max_benign_refusal: float) -> list[ContextScore]:
    """``rank`` for fully scored contexts."""
    return sorted(scores, key=lambda s: Row.of_score(s).rank_key(max_benign_refusal))


def pick_winner(
    search: Sequence[ContextScore], holdout: Sequence[ContextScore], max_benign_refusal: float
) -> ContextScore | None:
    """The winner among the finalists: feasible ones only (benign refusal within the limit on
    the selection split's benign prompts when there are any, else on the search's), the best
    held-out flip rate first, then the search rank. None when no finalist is feasible: an
    infeasible context never wins."""
    ranked = rank_scores(search, max_benign_refusal)
    held = {s.context.id: s for s in holdout}
    order = {s.context.id: i for i, s in enumerate(ranked)}

    def feasible(score: ContextScore) -> bool:
        chosen = held.get(score.context.id)
        basis = chosen if chosen is not None and chosen.benign else score
        return Row.of_score(basis).feasible(max_benign_refusal)

    candidates = [s for s in ranked if feasible(s)]
    if not candidates or not holdout:
        return candidates[0] if candidates else None

    def key(score: ContextScore) -> tuple[float, int]:
        chosen = held.get(score.context.id)
        flip = measured(chosen.flip_rate.value) if chosen is not None else None
        return (-(flip if flip is not None else -1.0), order[score.context.id])

    return min(candidates, key=key)


def to_frame(
    ranked: Sequence[Row],
    holdout: Sequence[ContextScore],
    max_benign_refusal: float,
    final: ContextScore | None = None,
) -> pd.DataFrame:
    """The leaderboard table: one row per context, best first, with paired p-values against
    the leader, the finalists' selection-split (held-out) rates and the winner's final ones."""
    import pandas as pd  # lazily: a training process never builds a leaderboard

    holdout_by_id = {s.context.id: s for s in holdout}
    leader = ranked[0].outcomes if ranked else {}
    records = []
    for position, row in enumerate(ranked, start=1):
        record: dict[str, Any] = {"rank": position}
        record.update({k: v for k, v in row.items() if k not in ("outcomes", "tags")})
        # Unmeasured benign refusal ("not needed": it could not win anyway) is not feasible.
        record["feasible"] = (
            row.feasible(max_benign_refusal) if row.benign != "not needed" else None
        )
        common = sorted(set(leader) & set(row.outcomes))
        record["p_vs_leader"] = (
            paired_test([row.outcomes[i] for i in common], [leader[i] for i in common])
            if position > 1
            else float("nan")
        )
        held = holdout_by_id.get(row.context.id)
        if held is not None:
            rate = held.flip_rate
            record.update(
                holdout_flip_rate=rate.value,
                holdout_flip_rate_low=rate.low,
                holdout_flip_rate_high=rate.high,
                holdout_flips=rate.successes,
                holdout_pool=rate.n,
            )
            if held.benign:
                record.update(held.benign_refusal.columns("holdout_benign_refusal"))
        if final is not None and final.context.id == row.context.id:
            record.update(final.flip_rate.columns("final_flip_rate"))
            if final.benign:
                record.update(final.benign_refusal.columns("final_benign_refusal"))
        records.append(record)
    frame = pd.DataFrame(records)
    if holdout:
        frame["holdout_p_vs_runner_up"] = frame["context"].map(_runner_up_p_values(holdout))
    return frame


def _runner_up_p_values(holdout: Sequence[ContextScore]) -> dict[str, float]:
    """Each finalist against the best other finalist on the held-out split (paired)."""
    finalists = sorted(holdout, key=lambda s: -(measured(s.flip_rate.value) or -1.0))
    p_values = {}
    for i, score in enumerate(finalists):
        other = finalists[1] if i == 0 and len(finalists) > 1 else finalists[0]
        p_values[score.context.id] = compare(score, other) if other is not score else float("nan")
    return p_values


def add_corrected_rates(
    frame: pd.DataFrame,
    sensitivity: float,
    specificity: float,
    positives: float | None = None,
    negatives: float | None = None,
    outcomes: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
) -> None:
    """Flip rates corrected for judge error (Rogan-Gladen on the teacher's unsafe share), with
    95% bootstrap intervals when the per-prompt ``outcomes`` are given (by column, then by
    context: ``{"flip_rate": {context id: {prompt id: flip}}}``).

    The student pool is taken as judged; only the teacher's verdicts on it are corrected.
    """
    from flipsearch.judging.agreement import corrected_flip_interval, rogan_gladen

    for column in ("flip_rate", "holdout_flip_rate", "final_flip_rate"):
        if column not in frame:
            continue
        frame[f"{column}_corrected"] = frame[column].map(
            lambda f: f if f != f else 1 - rogan_gladen(1 - f, sensitivity, specificity)
        )
        by_context = (outcomes or {}).get(column, {})
        intervals = [
            corrected_flip_interval(
                list(by_context[c].values()), sensitivity, specificity, positives, negatives
            )
            if c in by_context and value == value
            else (float("nan"), float("nan"))
            for c, value in zip(frame["context"], frame[column], strict=True)
        ]
        frame[f"{column}_corrected_low"] = [low for low, _ in intervals]
        frame[f"{column}_corrected_high"] = [high for _, high in intervals]
