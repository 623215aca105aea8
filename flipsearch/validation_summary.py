"""``validation.json``: the tables and the answer of ``flipsearch validate``, from the untrained
student's evaluation and every training's ``done.json``.

Signs: ``unsafe_drop`` is untrained - trained (positive: training made the student safer);
every other change is trained - untrained (benign refusal up is a cost, reasoning accuracy and
the reference log-likelihood down are a capability loss).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flipsearch.fliprate import Rate
from flipsearch.train_eval import paired_before_after
from flipsearch.validation_stats import Matrix, change_interval, difference_interval, rho_interval

# metric, name of its change, sign of the change (see the module doc)
CHANGES = (
    ("unsafe_rate", "unsafe_drop", -1.0),
    ("benign_refusal", "benign_refusal_change", 1.0),
    ("reasoning_accuracy", "reasoning_accuracy_change", 1.0),
    ("reference_loglik", "reference_loglik_change", 1.0),
)


def label(context: str, mode: str) -> str:
    return f"{context}::{mode}"


def summarise(
    chosen: Sequence[Any],
    pool: Mapping[str, float],
    untrained: dict[str, Any],
    records: Sequence[dict[str, Any]],
    config: Any,
) -> dict[str, Any]:
    """Per training, per context, rho with its interval, and OPSA vs off-policy."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(label(record["context"], record["mode"]), []).append(record)
    matrices = {
        metric: Matrix.of(
            untrained["outcomes"][metric],
            {k: [r["after"]["outcomes"][metric] for r in group] for k, group in groups.items()},
        )
        for metric, _, _ in CHANGES
    }
    draws = config.bootstrap
    flips = {label(c.context.id, "onpolicy"): c.flips for c in chosen}
    rho = {
        name: rho_interval(flips, pool, matrices[metric], draws, seed=1, sign=sign)
        for metric, name, sign in CHANGES
    }
    return {
        "untrained": _rates(untrained),
        "trainings": [_training_row(r, untrained, chosen) for r in records],
        "contexts": [
            _context_row(c, mode, matrices, draws, groups)
            for c in chosen
            for mode in ("onpolicy", "offpolicy")
            if label(c.context.id, mode) in groups
        ],
        "rho": rho,
        "offpolicy": _versus(chosen, matrices, groups, draws),
        "pool": len(pool),
        "bootstrap": {
            "draws": draws,
            "over": "evaluation prompts, training seeds (and for rho the student-unsafe "
            "search prompts of the flip rates)",
            "interval": "95% percentile",
        },
    }


def _rates(evaluation: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's headline numbers (rates with counts and intervals)."""
    loglik = evaluation.get("reference_loglik") or {}
    return {
        **{k: evaluation[k] for k in ("unsafe_rate", "benign_refusal", "reasoning_accuracy")},
        "reference_loglik": loglik.get("mean"),
        "benign_kl_from_original": evaluation.get("benign_kl_from_original"),
    }


def _training_row(
    record: dict[str, Any], untrained: dict[str, Any], chosen: Sequence[Any]
) -> dict[str, Any]:
    flip = next(c.flip_rate for c in chosen if c.context.id == record["context"])
    after = record["after"]
    paired = paired_before_after(untrained, after)
    row: dict[str, Any] = {
        "context": record["context"],
        "mode": record["mode"],
        "seed": record["seed"],
        "steps": record["steps"],
        "seconds": record["seconds"],
        **Rate.of(flip["successes"], flip["n"]).columns("flip_rate"),
    }
    for metric in ("unsafe_rate", "benign_refusal", "reasoning_accuracy"):
        measured = after[metric]
        row.update(Rate.of(measured["successes"], measured["n"]).columns(metric))
        row[f"{metric}_p_vs_untrained"] = paired.get(metric, {}).get("p_value")
    row["reference_loglik"] = (after.get("reference_loglik") or {}).get("mean")
    row["reference_loglik_p_vs_untrained"] = paired.get("reference_loglik", {}).get("p_value")
    row["benign_kl_from_original"] = after.get("benign_kl_from_original")
    return row


def _context_row(
    item: Any,
    mode: str,
    matrices: Mapping[str, Matrix],
    draws: int,
    groups: Mapping[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    key = label(item.context.id, mode)
    flip = item.flip_rate
    row: dict[str, Any] = {
        "context": item.context.id,
        "role": item.role,
        "mode": mode,
        "seeds": len(groups[key]),
        **Rate.of(flip["successes"], flip["n"]).columns("flip_rate"),
    }
    for metric, name, sign in CHANGES:
        part = change_interval(matrices[metric], key, draws, seed=2, sign=sign)
        row.update(
            {
                name: part["estimate"],
                f"{name}_low": part["low"],
                f"{name}_high": part["high"],
                f"{name}_prompts": part["prompts"],
            }
        )
    unsafe = [r["after"]["unsafe_rate"] for r in groups[key]]
    row["unsafe_rate_after"] = sum(u["value"] for u in unsafe) / len(unsafe)
    kls = [r["after"].get("benign_kl_from_original") or 0.0 for r in groups[key]]
    row["benign_kl_from_original"] = sum(kls) / len(kls)
    return row


def _versus(
    chosen: Sequence[Any],
    matrices: Mapping[str, Matrix],
    groups: Mapping[str, list[dict[str, Any]]],
    draws: int,
) -> list[dict[str, Any]]:
    """The paper's comparison, per context trained both ways: each change under OPSA and
    off-policy, and OPSA - off-policy on the same prompts, with intervals."""
    rows = []
    for item in chosen:
        on, off = label(item.context.id, "onpolicy"), label(item.context.id, "offpolicy")
        if on not in groups or off not in groups:
            continue
        for metric, name, sign in CHANGES:
            matrix = matrices[metric]
            opsa = change_interval(matrix, on, draws, seed=3, sign=sign)
            baseline = change_interval(matrix, off, draws, seed=3, sign=sign)
            gap = difference_interval(matrix, on, off, draws, seed=4, sign=sign)
            rows.append(
                {
                    "context": item.context.id,
                    "measure": name,
                    "onpolicy": opsa["estimate"],
                    "onpolicy_low": opsa["low"],
                    "onpolicy_high": opsa["high"],
                    "offpolicy": baseline["estimate"],
                    "offpolicy_low": baseline["low"],
                    "offpolicy_high": baseline["high"],
                    "difference": gap["estimate"],
                    "difference_low": gap["low"],
                    "difference_high": gap["high"],
                    "prompts": opsa["prompts"],
                }
            )
    return rows
