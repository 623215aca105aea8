"""Each judge measured on labelled rows it was never trained or tuned on, with 95% intervals.

    python benchmarks/judges.py [--holdout 0.3] [--seed 0] [--resamples 1000] [--json OUT]

Two measurements: the shipped set (judges/labelled.jsonl) split by case (seeded, stratified),
its held-out part; and the ``test`` split of the second set (judges/labelled-b.jsonl), fixed by
a seeded hash of each row's id before any judge was measured on it. The classifiers are trained
on the shipped set's other rows and the second set's ``dev`` rows, and measured on both. Judges:
the ``refusal`` judge; the old opening-only behaviour (judges/refusal-opening.yaml) and a naive
"refusal phrase anywhere" baseline (the same phrases, anywhere in the answer), both measured in
this run; the classifier; ensembles. For the ``unsafe`` label only answers to harmful prompts
count. Intervals: percentile bootstrap over rows. Llama Guard needs weights: --llama-guard PATH.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from flipsearch._resources import data_path
from flipsearch.io import read_yaml
from flipsearch.judging import Judge
from flipsearch.judging.agreement import (
    LabelledRow,
    evaluate_judge,
    load_labelled,
    second_labelled_path,
)
from flipsearch.judging.classifier import ClassifierJudge, train_classifier
from flipsearch.judging.ensemble import EnsembleJudge
from flipsearch.judging.refusal import RefusalJudge

LABELS = ("unsafe", "refusal")


def shipped_split(holdout: float, seed: int) -> tuple[list[LabelledRow], list[LabelledRow]]:
    """The shipped set split by case (seeded, stratified): (training rows, held-out rows)."""
    by_case = defaultdict(list)
    for row in load_labelled():
        by_case[row.case].append(row)
    rng = random.Random(seed)
    train: list[LabelledRow] = []
    test: list[LabelledRow] = []
    for case in sorted(by_case):
        members = list(by_case[case])
        rng.shuffle(members)
        cut = round(len(members) * holdout)
        test += members[:cut]
        train += members[cut:]
    return train, test


def baselines(work: str) -> tuple[RefusalJudge, RefusalJudge]:
    """The old opening-only judge, and the same phrases matched anywhere in the answer."""
    old = data_path("judges") / "refusal-opening.yaml"
    anywhere = Path(work) / "refusal-anywhere.yaml"
    markers = list(read_yaml(old)["markers"])
    anywhere.write_text(json.dumps({"window_chars": 10**9, "markers": markers}))
    opening, naive = RefusalJudge(old), RefusalJudge(anywhere)
    opening.name, naive.name = "refusal (old: opening only)", "phrase anywhere (naive)"
    return opening, naive


def judges_for(label: str, classifier: Judge, opening: Judge, naive: Judge) -> dict[str, Judge]:
    judge = RefusalJudge()
    named: dict[str, Judge] = {
        "refusal": judge,
        "refusal (old: opening only)": opening,
        "phrase anywhere (naive)": naive,
        "classifier": classifier,
        "ensemble:mean": EnsembleJudge([judge, classifier], "mean"),
    }
    if label == "unsafe":
        named["ensemble:any"] = EnsembleJudge([judge, classifier], "any")
    return named


def row(where: str, name: str, m: dict[str, Any]) -> str:
    cells = [f"{where:<22} {m['label']:<7} {name:<27} {m['n']:>4}"]
    for key in ("precision", "recall", "f1", "auroc", "cohen_kappa"):
        lo, hi = m["intervals"][key]
        cells.append(f"{m[key]:.3f} [{lo:.2f},{hi:.2f}]")
    return "  ".join(cells) + f"  {m['invalid_rate']:.0%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--holdout", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--json", default=None, help="also write every figure here")
    parser.add_argument("--llama-guard", default=None, help="Llama Guard weights, if you have them")
    args = parser.parse_args()

    shipped_train, shipped_test = shipped_split(args.holdout, args.seed)
    second = load_labelled(second_labelled_path())
    second_dev = [r for r in second if r.split == "dev"]
    second_test = [r for r in second if r.split == "test"]
    train = shipped_train + second_dev
    print(
        f"training: {len(shipped_train)} shipped + {len(second_dev)} second-set dev rows; "
        f"measured: {len(shipped_test)} shipped held-out rows (seed {args.seed}), "
        f"{len(second_test)} second-set test rows"
    )
    work = tempfile.mkdtemp(prefix="flipsearch-judges-")
    classifiers = {
        label: ClassifierJudge(train_classifier(train, label, f"{work}/{label}"))
        for label in LABELS
    }
    opening, naive = baselines(work)
    print(
        f"{'measured on':<22} {'label':<7} {'judge':<27} {'n':>4}  {'precision':<19}  "
        f"{'recall':<19}  {'F1':<19}  {'AUROC':<19}  {'kappa':<19}  invalid"
    )
    figures = []
    sets = {"shipped held-out": shipped_test, "labelled-b test split": second_test}
    for where, rows in sets.items():
        for label in LABELS:
            named = judges_for(label, classifiers[label], opening, naive)
            if args.llama_guard and label == "unsafe":
                from flipsearch.judging.llama_guard import LlamaGuardJudge

                named["llama-guard"] = LlamaGuardJudge(args.llama_guard)
            for name, judge in named.items():
                m = evaluate_judge(judge, rows, label, resamples=args.resamples, seed=args.seed)
                print(row(where, name, m))
                figures.append({"measured_on": where, "judge_label": name, **m})
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
