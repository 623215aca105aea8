"""The pruner: paired tests against contenders only, successive halving at rungs."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from flipsearch.pruning import (
    INFEASIBLE,
    WITHIN_LIMIT,
    RungPruner,
    is_contender,
    leader,
    paired_p,
    rung_sizes,
)

MEAN = 1_000_000


def _trial(flips, state=TrialState.COMPLETE, constraint=None, infeasible=False):
    """A finished trial that flipped ``flips[i]`` on prompt i."""
    values = dict(enumerate(flips))
    system = {} if constraint is None else {"constraints:benign_refusal": constraint}
    return create_trial(
        state=state,
        value=sum(flips) / len(flips) if state == TrialState.COMPLETE else None,
        intermediate_values=values,
        params={"x": 0.0},
        distributions={"x": FloatDistribution(0, 1)},
        user_attrs={INFEASIBLE: True} if infeasible else {},
        system_attrs=system,
    )


def _study(*trials):
    study = optuna.create_study(direction="maximize")
    for trial in trials:
        study.add_trial(trial)
    return study


def _asks(study, flips, pruner):
    """Whether ``pruner`` stops a new trial that flipped ``flips`` so far."""
    trial = study.ask()
    for step, flip in enumerate(flips):
        trial.report(flip, step)
    frozen = study._storage.get_trial(trial._trial_id)
    return pruner.prune(study, frozen)


def test_rungs_start_after_the_screened_chunk_and_grow_by_the_rate():
    assert rung_sizes(8, 3, 100) == [24, 72]
    assert rung_sizes(8, 2, 40) == [16, 32]
    assert rung_sizes(8, 1, 100) == []  # rate 1: no rungs


def test_a_context_over_the_benign_limit_never_sets_the_bar():
    """The best trial broke the benign limit: a weaker, feasible context is not pruned
    against it (it may be the winner); a feasible best of the same strength prunes it."""
    strong = [1.0] * 12
    weak = [1.0, 0.0] * 6
    pruner = RungPruner(MEAN, chunk=12, p_threshold=0.1, eta=1)
    over = _study(_trial(strong, constraint=0.3))
    assert not _asks(over, weak, pruner)
    within = _study(_trial(strong, constraint=-0.1))
    assert _asks(within, weak, pruner)
    assert "Wilcoxon" in pruner.reason[1]


def test_a_trial_in_flight_is_a_contender_while_its_benign_refusal_is_within_the_limit():
    study = _study()
    running = study.ask()
    for step in range(12):
        running.report(1.0, step)
    assert not is_contender(study._storage.get_trial(running._trial_id))  # benign unknown
    running.set_user_attr(WITHIN_LIMIT, True)
    frozen = study._storage.get_trial(running._trial_id)
    assert is_contender(frozen)
    assert leader(study, dict.fromkeys(range(12), 0.0), before=99)[0].number == running.number
    pruner = RungPruner(MEAN, chunk=12, p_threshold=0.1, eta=1)
    assert _asks(study, [1.0, 0.0] * 6, pruner)  # pruned against the partial curve
    running.set_user_attr(INFEASIBLE, True)
    assert not is_contender(study._storage.get_trial(running._trial_id))
    assert not _asks(study, [1.0, 0.0] * 6, pruner)


def test_a_rung_keeps_the_top_third_of_the_trials_that_reached_it():
    """Near-ties the paired test cannot separate are cut at a rung."""
    others = [_trial([1.0] * k + [0.0] * (6 - k)) for k in (6, 5, 4, 4)]
    study = _study(*others)
    pruner = RungPruner(MEAN, chunk=2, p_threshold=0.0, eta=3)  # no paired test: rungs only
    assert _asks(study, [1.0] * 4 + [0.0] * 2, pruner)  # 4/6: two trials flipped more
    assert "rung of 6 prompts" in pruner.reason[max(pruner.reason)]
    assert not _asks(study, [1.0] * 5 + [0.0], pruner)  # 5/6: only one flipped more
    assert not _asks(study, [1.0] * 4, pruner)  # 4 prompts is no rung


def test_a_trial_is_judged_against_earlier_trials_only():
    """A later trial, however far it got, sets no bar: a trial's verdict is the one it gets
    when the trials run one at a time."""
    study = _study()
    checked = study.ask()
    for step, flip in enumerate([1.0, 0.0] * 6):
        checked.report(flip, step)
    later = study.ask()
    for step in range(12):
        later.report(1.0, step)
    later.set_user_attr(WITHIN_LIMIT, True)
    pruner = RungPruner(MEAN, chunk=12, p_threshold=0.1, eta=1)
    assert not pruner.prune(study, study._storage.get_trial(checked._trial_id))
    assert leader(study, dict.fromkeys(range(12), 0.0), before=checked.number) is None
    assert _asks(study, [1.0, 0.0] * 6, pruner)  # a trial after both is pruned


def test_a_context_known_to_break_the_benign_limit_takes_no_place_at_a_rung():
    over = [
        _trial([1.0] * 6, constraint=0.2),
        _trial([1.0] * 6, infeasible=True, state=TrialState.PRUNED),
    ]
    feasible = [_trial([1.0] * 5 + [0.0])]
    pruner = RungPruner(MEAN, chunk=2, p_threshold=0.0, eta=3)
    # Ranked among the feasible (or unknown) only: one of two flipped more, the top 1 of 2...
    assert not _asks(_study(*over, *feasible), [1.0] * 4 + [0.0] * 2, pruner)  # n < eta: no cut
    # ... and with two feasible trials ahead of it, it is cut.
    study = _study(*over, *feasible, _trial([1.0] * 6, constraint=-0.1))
    assert _asks(study, [1.0] * 4 + [0.0] * 2, pruner)
    assert "2 of 3 trials" in pruner.reason[max(pruner.reason)]


def test_paired_p_is_one_sided_and_one_when_not_behind():
    assert paired_p({0: 1.0, 1: 1.0}, {0: 0.0, 1: 0.0}) == 1.0
    assert paired_p({s: 0.0 for s in range(5)}, {s: 1.0 for s in range(5)}) == pytest.approx(1 / 32)


@pytest.mark.parametrize("eta", [0, -1])
def test_the_halving_rate_is_checked(eta):
    with pytest.raises(ValueError, match="eta"):
        RungPruner(MEAN, chunk=2, eta=eta)
