"""The search's pruner: paired comparisons on shared prompts, against contenders, in rungs.

Every trial meets the student-unsafe pool in one shared order, so after k chunks any two trials
have been scored on the same prompts, whether they are complete or still in flight. A trial is
compared with earlier trials only (lower numbers: with one worker, those that finished before
its check), so its verdict is the one a one-at-a-time search gives it. It is stopped at a
pruning check when

- a paired Wilcoxon test on those prompts says it flips less than the best *contender* (a
  trial that may win: complete and feasible, or still in flight with its benign refusal so
  far within the limit), or
- at a rung of successive halving (``chunk * eta``, ``chunk * eta**2`` ... prompts) it is not
  in the top ``1/eta`` of the trials that reached the rung and are not known to break the
  benign limit (measured on the same prompts, so this, too, is a paired comparison).

Why both: on prompt sets the project had never seen, many weak contexts sat close to the best,
where a significance test keeps them to the end; and contexts that broke the benign limit were
the best trials the test compared against (or, before one finished, there was nothing to
compare with, so nothing was pruned). Rungs prune near-ties at a bounded cost (a context within
noise of the best is not significantly worse if it is the one kept); contenders keep a context
the benign limit rules out from setting the bar.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

INFEASIBLE = "infeasible"  # user attr: the trial's benign refusal is surely over the limit
WITHIN_LIMIT = "benign_within_limit"  # user attr: its benign refusal so far is within the limit


def rung_sizes(chunk: int, eta: int, pool: int) -> list[int]:
    """The prompt counts at which successive halving ranks trials: chunk*eta, chunk*eta**2, ...
    below ``pool``. The first chunk is no rung: the seed screen measured it for every seed and
    ran them strongest first, so ranking there would prune all but the first few."""
    sizes: list[int] = []
    size = chunk * eta
    while size < pool and eta > 1:
        sizes.append(size)
        size *= eta
    return sizes


def scored(trial: FrozenTrial, mean_step: int) -> dict[int, float]:
    """A trial's per-prompt flips (``mean_step``, past every prompt, holds a pruned trial's
    running mean)."""
    return {s: v for s, v in trial.intermediate_values.items() if s < mean_step}


def is_infeasible(trial: FrozenTrial) -> bool:
    """Known to break the benign limit: stopped on it, or complete and over it."""
    if trial.user_attrs.get(INFEASIBLE):
        return True
    return trial.state == TrialState.COMPLETE and any(v > 0 for v in trial.constraints.values())


def is_contender(trial: FrozenTrial) -> bool:
    """Could win: complete and feasible, or in flight with its benign refusal measured and,
    so far, within the limit. A trial in flight whose benign refusal is unknown does not set
    the bar: a context that flips much but refuses too much would prune the winner before it
    is found out (measured on prompt sets made unlike the shipped ones)."""
    if trial.user_attrs.get(INFEASIBLE):
        return False
    if trial.state == TrialState.COMPLETE:
        return all(v <= 0 for v in trial.constraints.values())
    return trial.state == TrialState.RUNNING and trial.user_attrs.get(WITHIN_LIMIT) is True


def on_same_prompts(
    trials: Iterable[FrozenTrial], steps: Mapping[int, float], before: int
) -> list[tuple[FrozenTrial, float]]:
    """The trials numbered below ``before`` scored on every one of ``steps``, with their flips
    summed over them. Only earlier trials: a trial is judged against those that started
    before it, so its verdict does not depend on how far later trials in flight have got (one
    worker's trials get the verdicts of a one-at-a-time search however many are in flight)."""
    found = []
    for other in trials:
        if other.number >= before:
            continue
        values = other.intermediate_values
        if all(s in values for s in steps):
            found.append((other, sum(values[s] for s in steps)))
    return found


def leader(
    study: optuna.Study, steps: Mapping[int, float], before: int
) -> tuple[FrozenTrial, float] | None:
    """The earlier contender with the most flips on ``steps`` (None when none reached them)."""
    contenders = [
        (t, total)
        for t, total in on_same_prompts(study.get_trials(deepcopy=False), steps, before)
        if is_contender(t)
    ]
    return max(contenders, key=lambda pair: (pair[1], -pair[0].number), default=None)


def paired_p(mine: Mapping[int, float], theirs: Mapping[int, float]) -> float:
    """One-sided paired Wilcoxon p (zsplit: ties count half each way) that ``mine`` flips
    less than ``theirs`` on ``mine``'s steps; 1 when it does not flip less."""
    diffs = [mine[s] - theirs[s] for s in mine]
    if sum(diffs) >= 0:
        return 1.0
    import scipy.stats as ss  # lazily: 60 MB that a process which never prunes need not hold

    return float(ss.wilcoxon(diffs, alternative="less", zero_method="zsplit").pvalue)


class RungPruner(optuna.pruners.BasePruner):
    """Paired Wilcoxon against the best contender, and successive halving at rungs."""

    def __init__(self, mean_step: int, chunk: int, p_threshold: float = 0.1, eta: int = 3) -> None:
        if eta < 1:
            raise ValueError(f"eta must be at least 1, got {eta}")
        self.mean_step, self.chunk = mean_step, chunk
        self.p_threshold, self.eta = p_threshold, eta
        self.reason: dict[int, str] = {}  # trial number -> why it was pruned (for its row)

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        steps = scored(trial, self.mean_step)
        if len(steps) < 2:
            return False
        mine = sum(steps.values())
        others = on_same_prompts(study.get_trials(deepcopy=False), steps, trial.number)
        if len(steps) in rung_sizes(self.chunk, self.eta, self.mean_step):
            # A context known to break the benign limit takes no place in the top 1/eta.
            ranked = [(t, total) for t, total in others if not is_infeasible(t)]
            keep = math.ceil((len(ranked) + 1) / self.eta)
            ahead = sum(total > mine for _, total in ranked)
            if len(ranked) + 1 >= self.eta and ahead >= keep:
                self.reason[trial.number] = (
                    f"rung of {len(steps)} prompts: {ahead} of {len(ranked) + 1} trials flipped "
                    f"more (the top {keep} go on)"
                )
                return True
        best = max(
            ((t, total) for t, total in others if is_contender(t)),
            key=lambda pair: pair[1],
            default=None,
        )
        if best is None or best[1] <= mine:
            return False
        p = paired_p(steps, best[0].intermediate_values)
        if p < self.p_threshold:
            self.reason[trial.number] = (
                f"paired Wilcoxon vs trial {best[0].number} on {len(steps)} prompts: p={p:.3g}"
            )
            return True
        return False
