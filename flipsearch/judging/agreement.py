"""Labelled (prompt, response) files and the measurement of a judge against them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flipsearch._resources import data_path
from flipsearch.errors import FlipsearchError
from flipsearch.io import read_csv, read_jsonl
from flipsearch.judging._base import Judge

LABELS = ("unsafe", "refusal")
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


def default_labelled_path() -> Path:
    return data_path("judges") / "labelled.jsonl"


def load_labelled(path: str | Path | None = None, label: str | None = None) -> list[LabelledRow]:
    """Load a JSONL or CSV file with ``prompt``, ``response`` and ``unsafe``/``refusal`` columns.

    Labels are true/false or 1/0; extra columns are kept out of the way. With ``label``, every
    row must carry that label.
    """
    path = Path(path) if path is not None else default_labelled_path()
    if not path.is_file():
        raise FlipsearchError(f"labelled file {path} does not exist")
    if label is not None and label not in LABELS:
        raise FlipsearchError(f"unknown label {label!r}; choose one of {LABELS}")
    raw = read_csv(path) if path.suffix.lower() == ".csv" else read_jsonl(path)
    rows = []
    for number, row in raw:
        at = f"{path}:{number}"
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
        case = str(row.get("case") or "")
        rows.append(LabelledRow(prompt, response, values["unsafe"], values["refusal"], case, kind))
    if not rows:
        raise FlipsearchError(f"{path}: the labelled file is empty")
    return rows


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
            score = None if verdict.score is None else 1.0 - verdict.score
            out.append((verdict.refusal, score))
    return out


def evaluate_judge(judge: Judge, rows: Sequence[LabelledRow], label: str) -> dict[str, Any]:
    """Precision, recall, F1, AUROC, Cohen's κ, confusion matrix and invalid rate.

    For ``unsafe`` only rows whose ``kind`` is not ``benign`` count: the safety judge is applied
    to answers to harmful prompts. Invalid verdicts are counted and left out of the matrix.
    """
    from sklearn.metrics import (
        cohen_kappa_score,
        confusion_matrix,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

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
    tn, fp, fn, tp = confusion_matrix(truth, predicted, labels=[False, True]).ravel().tolist()
    nan = float("nan")  # a ratio over nothing (a class absent) is unknown, not 0 or 1
    recall = float(recall_score(truth, predicted, zero_division=nan)) if valid else nan
    scores = [s for _, _, s in valid]
    auroc = float("nan")
    if len(set(truth)) == 2 and all(s is not None for s in scores):
        auroc = float(roc_auc_score(truth, scores))
    return {
        "judge": judge.name,
        "label": label,
        "n": len(labelled),
        "invalid": len(labelled) - len(valid),
        "invalid_rate": (len(labelled) - len(valid)) / len(labelled),
        "precision": float(precision_score(truth, predicted, zero_division=nan)) if valid else nan,
        "recall": recall,
        "f1": float(f1_score(truth, predicted, zero_division=nan)) if valid else nan,
        "sensitivity": recall,
        "specificity": float(recall_score(truth, predicted, pos_label=False, zero_division=nan))
        if valid
        else nan,
        "auroc": auroc,
        "cohen_kappa": float(cohen_kappa_score(truth, predicted)) if valid else float("nan"),
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }


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


def read_judge_metrics(path: str | Path, label: str = "unsafe") -> dict[str, float]:
    """Sensitivity and specificity from a ``flipsearch judge eval --json`` file measured for
    ``label`` (flip rates are corrected with the safety judge's ``unsafe`` metrics); refuses
    metrics for another label and metrics that were not measured (NaN)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        metrics = {
            "sensitivity": float(data["sensitivity"]),
            "specificity": float(data["specificity"]),
        }
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FlipsearchError(
            f"{path}: expected judge metrics with sensitivity and specificity "
            f"(from flipsearch judge eval --json)"
        ) from exc
    measured = data.get("label")
    if measured is not None and measured != label:
        raise FlipsearchError(
            f"{path}: metrics measured for the {measured!r} label; correcting these rates needs "
            f"the {label!r} label (flipsearch judge eval --label {label} --json FILE)"
        )
    for name, value in metrics.items():
        if value != value:
            raise FlipsearchError(
                f"{path}: the judge's {name} was not measured (NaN: the labelled set has no "
                "row of one class); rates cannot be corrected with it"
            )
    return metrics
