"""The statistics of ``flipsearch validate``: changes from the untrained student, Spearman's rho
between flip rate and those changes, and bootstrap intervals over prompts and training seeds.

Inputs are per-prompt outcomes (``evaluate_student``'s ``outcomes``: prompt id -> value, None
where every verdict was invalid) of the untrained student and of each training seed of a
context, all on the same evaluation prompts. A change is ``trained - untrained``, averaged over
the prompts every side measured and over the seeds; the unsafe rate's *drop* is its negative.

The bootstrap draws, each time, the evaluation prompts with replacement (one draw shared by
every context and seed, so the comparison stays paired), each context's training seeds with
replacement (so a difference no larger than training noise gets a wide interval), and, for
rho, the student-unsafe search prompts the flip rates were measured on. Percentile intervals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Outcomes = Mapping[str, float | None]


@dataclass
class Matrix:
    """One metric on its common prompts: the untrained values (n,) and, per context, the
    trained values (seeds, n)."""

    prompts: list[str]
    untrained: np.ndarray
    trained: dict[str, np.ndarray]

    @classmethod
    def of(cls, untrained: Outcomes, trained: Mapping[str, Sequence[Outcomes]]) -> Matrix:
        """Only prompts that the untrained student and every training measured (a prompt all
        of whose verdicts were invalid on one side has no paired value)."""
        runs = [seed for seeds in trained.values() for seed in seeds]
        prompts = [
            p
            for p, v in untrained.items()
            if v is not None and all(run.get(p) is not None for run in runs)
        ]
        base = np.array([float(untrained[p]) for p in prompts])  # type: ignore[arg-type]
        values = {
            context: np.array([[float(run[p]) for p in prompts] for run in seeds])  # type: ignore[arg-type]
            for context, seeds in trained.items()
        }
        return cls(prompts, base, values)

    def change(self, context: str, rows: Any = None, seeds: Any = None) -> float:
        """Mean over seeds and prompts of trained - untrained (NaN without prompts)."""
        table = self.trained[context]
        if seeds is not None:
            table = table[seeds]
        base = self.untrained
        if rows is not None:
            table, base = table[:, rows], base[rows]
        if table.size == 0:
            return math.nan
        return float(table.mean() - base.mean())


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho (average ranks for ties); None when it is undefined (fewer than three
    points, or a side that does not vary)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    rho = float(spearmanr(x, y).statistic)
    return None if math.isnan(rho) else rho


def flip_rates(
    flips: Mapping[str, Mapping[str, float]], pool: Mapping[str, float], prompts: Sequence[str]
) -> dict[str, float]:
    """Each context's flip rate over ``prompts`` (student-unsafe prompts, with repeats as
    drawn): its flips over the student's unsafe shares ``pool`` (1 per prompt, greedy)."""
    weight = sum(pool[p] for p in prompts)
    return {
        context: sum(outcomes.get(p, 0.0) for p in prompts) / weight if weight else math.nan
        for context, outcomes in flips.items()
    }


def _interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float | None, ...]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return (None, None)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return (float(low), float(high))


def change_interval(
    matrix: Matrix, context: str, draws: int = 2000, seed: int = 0, sign: float = 1.0
) -> dict[str, Any]:
    """``sign`` x (trained - untrained) of one context: the estimate, its bootstrap interval
    over prompts and seeds, the prompts and seeds it rests on."""
    rng = np.random.default_rng(seed)
    n, seeds = len(matrix.prompts), matrix.trained[context].shape[0]
    estimate = sign * matrix.change(context)
    samples = [
        sign * matrix.change(context, rng.integers(n, size=n), rng.integers(seeds, size=seeds))
        for _ in range(draws if n and seeds else 0)
    ]
    low, high = _interval(samples)
    return {
        "estimate": None if math.isnan(estimate) else estimate,
        "low": low,
        "high": high,
        "prompts": n,
        "seeds": seeds,
    }


def difference_interval(
    matrix: Matrix, first: str, second: str, draws: int = 2000, seed: int = 0, sign: float = 1.0
) -> dict[str, Any]:
    """``sign`` x (change of ``first`` - change of ``second``) on the same prompts (OPSA vs
    off-policy): estimate and bootstrap interval, each side's seeds drawn on its own."""
    rng = np.random.default_rng(seed)
    n = len(matrix.prompts)
    s1, s2 = matrix.trained[first].shape[0], matrix.trained[second].shape[0]

    def gap(rows: Any = None, a: Any = None, b: Any = None) -> float:
        return sign * (matrix.change(first, rows, a) - matrix.change(second, rows, b))

    estimate = gap()
    samples = [
        gap(rng.integers(n, size=n), rng.integers(s1, size=s1), rng.integers(s2, size=s2))
        for _ in range(draws if n else 0)
    ]
    low, high = _interval(samples)
    return {"estimate": None if math.isnan(estimate) else estimate, "low": low, "high": high}


def rho_interval(
    flips: Mapping[str, Mapping[str, float]],
    pool: Mapping[str, float],
    matrix: Matrix,
    draws: int = 2000,
    seed: int = 0,
    sign: float = 1.0,
) -> dict[str, Any]:
    """Spearman's rho between the contexts' flip rates (over the student-unsafe ``pool``:
    prompt id -> the student's unsafe share) and
    ``sign`` x their change, with a bootstrap interval that redraws the pool's prompts, the
    evaluation prompts and each context's seeds. ``undefined`` counts draws where rho was
    (a side that did not vary); the interval is over the others."""
    contexts = [c for c in matrix.trained if c in flips]
    rng = np.random.default_rng(seed)
    n = len(matrix.prompts)

    def rho(pool_draw: Sequence[str], rows: Any = None, seeds: Any = None) -> float | None:
        rates = flip_rates({c: flips[c] for c in contexts}, pool, pool_draw)
        changes = [
            sign * matrix.change(c, rows, None if seeds is None else seeds[c]) for c in contexts
        ]
        return spearman([rates[c] for c in contexts], changes)

    ids = list(pool)
    estimate = rho(ids)
    samples: list[float] = []
    undefined = 0
    for _ in range(draws if n and ids and len(contexts) >= 3 else 0):
        pool_draw = [ids[i] for i in rng.integers(len(ids), size=len(ids))]
        rows = rng.integers(n, size=n)
        seeds = {
            c: rng.integers(len(matrix.trained[c]), size=len(matrix.trained[c])) for c in contexts
        }
        value = rho(pool_draw, rows, seeds)
        if value is None:
            undefined += 1
        else:
            samples.append(value)
    low, high = _interval(samples)
    return {
        "rho": estimate,
        "low": low,
        "high": high,
        "contexts": len(contexts),
        "draws": len(samples) + undefined,
        "undefined": undefined,
    }
