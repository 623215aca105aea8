"""Each judge measured on a held-out part of the shipped labelled set.

    python benchmarks/judges.py [--holdout 0.3] [--seed 0]

The labelled rows are split by case (seeded, stratified); classifiers are trained on the rest
and every judge is measured on the held-out rows, for the ``unsafe`` label (answers to harmful
prompts) and the ``refusal`` label. Llama Guard needs its weights: pass --llama-guard PATH.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from collections import defaultdict

from flipsearch.judging import Judge
from flipsearch.judging.agreement import evaluate_judge, load_labelled
from flipsearch.judging.classifier import ClassifierJudge, train_classifier
from flipsearch.judging.ensemble import EnsembleJudge
from flipsearch.judging.refusal import RefusalJudge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--holdout", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--llama-guard", default=None, help="Llama Guard weights, if you have them")
    args = parser.parse_args()

    rows = load_labelled()
    by_case = defaultdict(list)
    for row in rows:
        by_case[row.case].append(row)
    rng = random.Random(args.seed)
    train, test = [], []
    for case in sorted(by_case):
        members = list(by_case[case])
        rng.shuffle(members)
        cut = round(len(members) * args.holdout)
        test += members[:cut]
        train += members[cut:]
    print(f"{len(train)} training rows, {len(test)} held-out rows (seed {args.seed})")
    work = tempfile.mkdtemp(prefix="flipsearch-judges-")
    classifiers = {
        label: ClassifierJudge(train_classifier(train, label, f"{work}/{label}"))
        for label in ("unsafe", "refusal")
    }
    judges: dict[str, dict[str, Judge]] = {
        "unsafe": {
            "refusal": RefusalJudge(),
            "classifier": classifiers["unsafe"],
            "ensemble:any": EnsembleJudge([RefusalJudge(), classifiers["unsafe"]], "any"),
            "ensemble:mean": EnsembleJudge([RefusalJudge(), classifiers["unsafe"]], "mean"),
        },
        "refusal": {"refusal": RefusalJudge(), "classifier": classifiers["refusal"]},
    }
    if args.llama_guard:
        from flipsearch.judging.llama_guard import LlamaGuardJudge

        judges["unsafe"]["llama-guard"] = LlamaGuardJudge(args.llama_guard)
    header = (
        f"{'label':<8} {'judge':<14} {'n':>4} {'prec':>6} {'recall':>6} {'F1':>6} "
        f"{'spec':>6} {'AUROC':>6} {'kappa':>6} {'invalid':>7}"
    )
    print(header)
    for label, named in judges.items():
        for name, judge in named.items():
            m = evaluate_judge(judge, test, label)
            print(
                f"{label:<8} {name:<14} {m['n']:>4} {m['precision']:>6.3f} {m['recall']:>6.3f} "
                f"{m['f1']:>6.3f} {m['specificity']:>6.3f} {m['auroc']:>6.3f} "
                f"{m['cohen_kappa']:>6.3f} {m['invalid_rate']:>7.1%}"
            )


if __name__ == "__main__":
    main()
