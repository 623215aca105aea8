"""Run a context search into an Optuna storage of your choice, then read the study back.

    python examples/search_with_storage.py [--model smollm2-135m] [--storage sqlite:///study.db]

Any Optuna storage URL works: ``sqlite:///file.db`` for one machine, ``postgresql://...`` for
many (start the same script on each; they share the study's trials), or ``journal:PATH``.
Calling it again with the same --out and storage resumes the study.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import optuna

import flipsearch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="runs/example-search")
    parser.add_argument("--storage", default=None, help="default: sqlite:///OUT/study.db")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = args.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    result = flipsearch.search(
        model=args.model,
        out=out,
        trials=args.trials,
        storage=storage,
        study="example",
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
    )
    study = optuna.load_study(study_name="example", storage=storage)
    states = study.trials_dataframe(attrs=("number", "state", "value"))["state"]
    print(f"study 'example' in {storage}: {states.value_counts().to_dict()}")
    if result.winner is not None:
        print(f"winner: {result.winner.context.id}: {result.winner.flip_rate}")
    leaderboard = result.to_pandas()
    print(leaderboard[["context", "state", "flip_rate", "flip_rate_n", "benign"]].head(5))
    print(f"report: {flipsearch.render_report(out)}")


if __name__ == "__main__":
    main()
