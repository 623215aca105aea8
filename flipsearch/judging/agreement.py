"""Labelled (prompt, response) files and the measurement of a judge against them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flipsearch._resources import data_path
from flipsearch.errors import FlipsearchError
from flipsearch.io import read_json, read_table
from flipsearch.judging._base import Judge

LABELS = ("unsafe", "refusal")
SPLITS = ("dev", "test")
INTERVAL_METRICS = ("precision", "recall", "f1", "specificity", "auroc", "cohen_kappa")
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


@dataclass(frozen=True)
class LabelledRow:
    prompt: str
    response: str
    unsafe: bool | None
    refusal: bool | None
    case: str = ""
    kind: str = ""  # harmful or benign, when the file says
    split: str = ""  # dev (may be tuned on) or test (measurement only), when the file says


def default_labelled_path() -> Path:
    return data_path("judges") / "labelled.jsonl"


def second_labelled_path() -> Path:
    """The second, independently written set; its ``test`` rows are never trained or tuned on."""
    return data_path("judges") / "labelled-b.jsonl"


def load_labelled(
    path: str | Path | None = None, label: str | None = None, split: str | None = None
) -> list[LabelledRow]:
    """Load a JSONL or CSV file with ``prompt``, ``response`` and ``unsafe``/``refusal`` columns.

    Labels are true/false or 1/0; extra columns are kept out of the way. With ``label``, every
    row must carry that label; with ``split`` (dev or test), only that split's rows are kept.
    """
    path = Path(path) if path is not None else default_labelled_path()
    if path.is_dir():
        raise FlipsearchError(f"labelled file {path} is a directory; give a JSONL or CSV file")
    if not path.is_file():
        raise FlipsearchError(f"labelled file {path} does not exist")
    if label is not None and label not in LABELS:
        raise FlipsearchError(f"unknown label {label!r}; choose one of {LABELS}")
    if split is not None and split not in SPLITS:
        raise FlipsearchError(f"unknown split {split!r}; choose one of {SPLITS}")
    raw = read_table(path, "labelled file")
    rows = [_labelled_row(row, f"{path}:{number}", label) for number, row in raw]
    if not rows:
        raise FlipsearchError(f"{path}: the labelled file is empty")
    if split is not None:
        rows = [r for r in rows if r.split == split]
        if not rows:
            raise FlipsearchError(f"{path}: no row is in the {split!r} split")
    return rows


def _labelled_row(row: dict[str, Any], at: str, label: str | None) -> LabelledRow:
    prompt, response = row.get("prompt"), row.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise FlipsearchError(f"{at}: 'prompt' and 'response' must be text")
    values = {name: _boolean(row.get(name), at, name) for name in LABELS}
    if all(v is None for v in values.values()):
        raise FlipsearchError(f"{at}: no 'unsafe' or 'refusal' label")
    if label is not None and values[label] is None:
        raise FlipsearchError(f"{at}: no {label!r} label")
    kind = str(row.get("kind") or "")
    if kind not in ("", "harmful", "benign"):
        raise FlipsearchError(f"{at}: 'kind' must be harmful or benign, got {kind!r}")
    split = str(row.get("split") or "")
    if split not in ("", *SPLITS):
        raise FlipsearchError(f"{at}: 'split' must be dev or test, got {split!r}")
    case = str(row.get("case") or "")
    return LabelledRow(prompt, response, values["unsafe"], values["refusal"], case, kind, split)


def _boolean(value: Any, at: str, name: str) -> bool | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise FlipsearchError(f"{at}: {name!r} must be true/false or 1/0, got {value!r}")


def predictions(
    judge: Judge, rows: Sequence[LabelledRow], label: str
) -> list[tuple[bool | None, float | None]]:
    """The judge's (prediction, score) for ``label`` on each row; (None, None) when invalid."""
    verdicts = judge.judge([(r.prompt, r.response) for r in rows])
    out: list[tuple[bool | None, float | None]] = []
    for verdict in verdicts:
        if verdict.invalid:
            out.append((None, None))
        elif label == "unsafe":
            out.append((verdict.unsafe, verdict.score))
        else:
            if verdict.refusal is None:
                raise FlipsearchError(
                    f"judge {judge.name!r} does not say whether an answer refuses"
                )
            score = verdict.refusal_score
            if score is None and verdict.score is not None:
                score = 1.0 - verdict.score
            out.append((verdict.refusal, score))
    return out


def evaluate_judge(
    judge: Judge,
    rows: Sequence[LabelledRow],
    label: str,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Precision, recall, F1, AUROC, Cohen's κ, confusion matrix and invalid rate, with 95%
    percentile-bootstrap intervals (``intervals``; ``resamples=0`` leaves them out).

    For ``unsafe`` only rows whose ``kind`` is not ``benign`` count: the safety judge is applied
    to answers to harmful prompts. Invalid verdicts are counted and left out of the matrix.
    """
    if label not in LABELS:
        raise FlipsearchError(f"unknown label {label!r}; choose one of {LABELS}")
    labelled = [r for r in rows if getattr(r, label) is not None]
    if label == "unsafe":
        # The safety judge only ever sees answers to harmful prompts.
        labelled = [r for r in labelled if r.kind != "benign"]
    if not labelled:
        raise FlipsearchError(f"no row carries the {label!r} label")
    pairs = predictions(judge, labelled, label)
    valid = [
        (bool(getattr(r, label)), p, s)
        for r, (p, s) in zip(labelled, pairs, strict=True)
        if p is not None
    ]
    truth = [t for t, _, _ in valid]
    predicted = [bool(p) for _, p, _ in valid]
    scores = [s for _, _, s in valid]
    metrics: dict[str, Any] = {
        "judge": judge.name,
        "label": label,
        "n": len(labelled),
        "invalid": len(labelled) - len(valid),
        "invalid_rate": (len(labelled) - len(valid)) / len(labelled),
        **_point_metrics(truth, predicted, scores),
    }
    if resamples > 0:
        metrics["intervals"] = bootstrap_intervals(truth, predicted, scores, resamples, seed)
        metrics["bootstrap"] = {"resamples": resamples, "seed": seed, "level": 0.95}
    return metrics


def _point_metrics(
    truth: list[bool], predicted: list[bool], scores: list[float | None]
) -> dict[str, Any]:
    from sklearn.metrics import (
        cohen_kappa_score,
        confusion_matrix,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    nan = float("nan")  # a ratio over nothing (a class absent) is unknown, not 0 or 1
    if not truth:
        return {key: nan for key in (*INTERVAL_METRICS, "sensitivity")} | {
            "confusion": {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
        }
    tn, fp, fn, tp = confusion_matrix(truth, predicted, labels=[False, True]).ravel().tolist()
    recall = float(recall_score(truth, predicted, zero_division=nan))
    auroc = nan
    if len(set(truth)) == 2 and all(s is not None for s in scores):
        auroc = float(roc_auc_score(truth, scores))
    return {
        "precision": float(precision_score(truth, predicted, zero_division=nan)),
        "recall": recall,
        "f1": float(f1_score(truth, predicted, zero_division=nan)),
        "sensitivity": recall,
        "specificity": float(recall_score(truth, predicted, pos_label=False, zero_division=nan)),
        "auroc": auroc,
        "cohen_kappa": float(cohen_kappa_score(truth, predicted)),
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }


def bootstrap_intervals(
    truth: Sequence[bool],
    predicted: Sequence[bool],
    scores: Sequence[float | None],
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile-bootstrap intervals for each metric of ``INTERVAL_METRICS``.

    Rows are drawn with replacement ``resamples`` times (seeded, so the same inputs give the
    same intervals); a resample where a metric is undefined (a class absent) is skipped for that
    metric. AUROC needs every score; without them its interval is NaN.
    """
    import numpy as np

    nan = [float("nan"), float("nan")]
    if not truth:
        return {name: list(nan) for name in INTERVAL_METRICS}
    rng = np.random.default_rng(seed)
    n = len(truth)
    index = rng.integers(0, n, size=(resamples, n))
    t = np.asarray(truth, dtype=bool)[index]
    p = np.asarray(predicted, dtype=bool)[index]
    values = _resampled_metrics(t, p)
    values["auroc"] = (
        _resampled_auroc(np.asarray(scores, dtype=float)[index], t)
        if all(s is not None for s in scores)
        else np.full(resamples, np.nan)
    )
    tail = (1 - level) / 2 * 100
    out = {}
    for name in INTERVAL_METRICS:
        finite = values[name][np.isfinite(values[name])]
        bounds = np.percentile(finite, [tail, 100 - tail]) if finite.size else np.array(nan)
        out[name] = [float(bounds[0]), float(bounds[1])]
    return out


def _resampled_metrics(t: Any, p: Any) -> dict[str, Any]:
    """Each metric over the rows of every resample (one row of ``t``/``p`` per resample)."""
    import numpy as np

    tp = (t & p).sum(axis=1).astype(float)
    fp = (~t & p).sum(axis=1).astype(float)
    fn = (t & ~p).sum(axis=1).astype(float)
    tn = t.shape[1] - tp - fp - fn
    n = float(t.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        agreement = (tp + tn) / n
        chance = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / n**2
        return {
            "precision": tp / (tp + fp),
            "recall": tp / (tp + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
            "specificity": tn / (tn + fp),
            "cohen_kappa": (agreement - chance) / (1 - chance),
        }


def _resampled_auroc(s: Any, t: Any) -> Any:
    """Mann-Whitney AUROC of each resample, ties counted half (as ``roc_auc_score`` does)."""
    import numpy as np
    from scipy.stats import rankdata

    ranks = rankdata(s, axis=1)
    positives = t.sum(axis=1).astype(float)
    negatives = t.shape[1] - positives
    with np.errstate(divide="ignore", invalid="ignore"):
        u = (ranks * t).sum(axis=1) - positives * (positives + 1) / 2
        return u / (positives * negatives)


def rogan_gladen(observed: float, sensitivity: float, specificity: float) -> float:
    """A prevalence corrected for a judge's known error rates, clipped to [0, 1]."""
    if not (0 <= sensitivity <= 1 and 0 <= specificity <= 1):  # NaN too: a class was absent
        raise FlipsearchError(
            f"judge sensitivity {sensitivity} / specificity {specificity} are not both measured "
            "(the labelled set lacks one class?); rates cannot be corrected with them"
        )
    denominator = sensitivity + specificity - 1
    if denominator <= 0:
        raise FlipsearchError("judge sensitivity + specificity must exceed 1 to correct rates")
    return min(1.0, max(0.0, (observed + specificity - 1) / denominator))


def corrected_flip_interval(
    flips: Sequence[float],
    sensitivity: float,
    specificity: float,
    positives: float | None = None,
    negatives: float | None = None,
    draws: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """95% percentile bootstrap interval of a judge-corrected flip rate.

    Two sources of error, both resampled (as garak's bootstrap does): the prompts (``flips``,
    one outcome per student-unsafe prompt) and the judge's labelled set, whose sensitivity and
    specificity are redrawn as binomial shares of its ``positives`` and ``negatives`` when they
    are known (else held fixed). The teacher's unsafe share is corrected (Rogan-Gladen), as the
    point estimate is; draws where sensitivity + specificity <= 1 are left out.
    """
    import numpy as np

    outcomes = np.asarray(list(flips), dtype=float)
    if outcomes.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = outcomes[rng.integers(0, outcomes.size, size=(draws, outcomes.size))].mean(axis=1)

    def redrawn(share: float, count: float | None) -> Any:
        if not count:
            return np.full(draws, share)
        return rng.binomial(int(count), share, size=draws) / int(count)

    sens, spec = redrawn(sensitivity, positives), redrawn(specificity, negatives)
    usable = sens + spec - 1 > 0
    if not usable.any():
        return float("nan"), float("nan")
    unsafe = (1 - means[usable] + spec[usable] - 1) / (sens[usable] + spec[usable] - 1)
    corrected = 1 - np.clip(unsafe, 0.0, 1.0)
    low, high = np.percentile(corrected, [2.5, 97.5])
    return float(low), float(high)


ROLE_LABELS = {"safety": "unsafe", "refusal": "refusal"}  # the label a role's judge decides


def read_judge_metrics(path: str | Path, role: str = "safety") -> dict[str, float]:
    """Sensitivity and specificity from a ``flipsearch judge eval --json`` file, for the judge
    of ``role`` (flip rates are corrected with the safety judge's ``unsafe`` metrics).

    The file must say which label it measured, and that label must be the role's: metrics of
    the refusal label would otherwise correct safety rates (or the reverse) without a word.
    Metrics that were not measured (NaN) or are not shares in [0, 1] are refused too.
    """
    if role not in ROLE_LABELS:
        raise FlipsearchError(f"unknown judge role {role!r}; choose safety or refusal")
    label = ROLE_LABELS[role]
    path = Path(path)
    data = read_json(path)
    expected = "(from flipsearch judge eval --json)"
    if not isinstance(data, dict):
        raise FlipsearchError(f"{path}: expected a JSON object of judge metrics {expected}")
    measured = data.get("label")
    if measured is None:
        raise FlipsearchError(
            f"{path}: the metrics do not say which label they measured ('label'); write them "
            f"with flipsearch judge eval --label {label} --json FILE"
        )
    if measured != label:
        raise FlipsearchError(
            f"{path}: metrics measured for the {measured!r} label; correcting the {role} "
            f"judge's rates needs the {label!r} label "
            f"(flipsearch judge eval --label {label} --json FILE)"
        )
    metrics = {name: _share(data, name, path) for name in ("sensitivity", "specificity")}
    confusion = data.get("confusion")
    if isinstance(confusion, dict):  # the labelled set's size: the metrics' own uncertainty
        try:
            metrics["positives"] = int(confusion["tp"]) + int(confusion["fn"])
            metrics["negatives"] = int(confusion["tn"]) + int(confusion["fp"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FlipsearchError(f"{path}: 'confusion' needs tp, fp, fn and tn counts") from exc
    return metrics


def _share(data: dict[str, Any], name: str, path: Path) -> float:
    value = data.get(name)
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        raise FlipsearchError(
            f"{path}: expected judge metrics with sensitivity and specificity "
            f"(from flipsearch judge eval --json); {name!r} is {value!r}"
        )
    if value != value:
        raise FlipsearchError(
            f"{path}: the judge's {name} was not measured (NaN: the labelled set has no "
            "row of one class); rates cannot be corrected with it"
        )
    if not 0 <= value <= 1:
        raise FlipsearchError(f"{path}: the judge's {name} must be a share in [0, 1], got {value}")
    return float(value)
