"""Pruned search vs exhaustive scoring: teacher generations used and the winner found.

    python benchmarks/search.py [--limit 48] [--max-new-tokens 32] [--seeds 0,1,2,3,4]

Exhaustive scoring generates every seed context's teacher answers on the whole search split and
the benign set. The pruned search runs the same candidates as Optuna trials with the Wilcoxon
pruner, as `flipsearch run` does: each seed's first chunk of prompts is generated up front (the
screen), the seeds are enqueued strongest first, and each trial meets the pool in its own
shuffled order; the seed changes those orders (and how screening ties are broken). The search
measures benign refusal only for contexts that could still win ("skipped" counts the others)
and stops it once the limit is surely exceeded ("stopped"). Each method starts from a cache
holding only the student's answers, so its count of teacher generations is what it really
generated. A pruned winner that differs from the exhaustive one is compared with it by the
exact McNemar test on the exhaustive scores.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import optuna

from flipsearch import Decoding, Evaluator, GenerationCache, load_contexts, load_model
from flipsearch.fliprate import compare
from flipsearch.grammar import load_grammar
from flipsearch.leaderboard import Row, rank
from flipsearch.prompts import builtin_prompts, split_harmful
from flipsearch.search import (
    ContextObjective,
    SearchSettings,
    enqueue_seeds,
    open_study,
    trial_rows,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--max-benign-refusal", type=float, default=0.5)
    parser.add_argument("--prune-every", type=int, default=8)
    parser.add_argument(
        "--work",
        default=None,
        help="keep caches here and reuse the student's and the exhaustive one",
    )
    args = parser.parse_args()

    loaded = load_model(args.model)
    prompts = builtin_prompts()
    harmful = [p for p in prompts if p.kind == "harmful"][: args.limit]
    benign = [p for p in prompts if p.kind == "benign"][: args.limit]
    search_split, _ = split_harmful(harmful, 0.3, seed=0)
    contexts = load_contexts()
    decoding = Decoding(max_new_tokens=args.max_new_tokens)
    work = Path(args.work or tempfile.mkdtemp(prefix="flipsearch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    student_cache = work / "student.sqlite"
    student = Evaluator(loaded, decoding=decoding, cache=GenerationCache(student_cache))
    student.prefetch([*search_split, *benign], None)
    student.cache.close()  # type: ignore[union-attr]

    def fresh_evaluator(name: str) -> Evaluator:
        if name == "exhaustive" and (work / f"{name}.sqlite").exists():
            return Evaluator(
                loaded, decoding=decoding, cache=GenerationCache(work / f"{name}.sqlite")
            )
        for suffix in ("-wal", "-shm"):  # a stale log beside a fresh copy corrupts it
            (work / f"{name}.sqlite{suffix}").unlink(missing_ok=True)
        shutil.copy(student_cache, work / f"{name}.sqlite")
        return Evaluator(loaded, decoding=decoding, cache=GenerationCache(work / f"{name}.sqlite"))

    print(
        f"{len(contexts)} candidate contexts, {len(search_split)} search prompts, "
        f"{len(benign)} benign prompts, {args.max_new_tokens} new tokens, greedy"
    )
    started = time.perf_counter()
    exhaustive = fresh_evaluator("exhaustive")
    scores = {c.id: exhaustive.score(c, search_split, benign, "search") for c in contexts}
    rows = rank([Row.of_score(s) for s in scores.values()], args.max_benign_refusal)
    best = rows[0]["context"]
    # Exhaustive scoring generates every (context, prompt) pair once; a reused cache (--work)
    # generated them in an earlier run of this script.
    full = len(contexts) * (len(search_split) + len(benign))
    assert exhaustive.generated["teacher"] in (0, full)
    print(
        f"exhaustive: {full} teacher generations in {time.perf_counter() - started:.0f} s; "
        f"winner {best} ({scores[best].flip_rate})"
    )
    print(
        f"{'seed':>4} {'generations':>11} {'share':>6} {'pruned':>6} {'skipped':>7} "
        f"{'stopped':>7} {'seconds':>7}  "
        "winner (p vs exhaustive winner)"
    )
    shares, same = [], 0
    for seed in [int(s) for s in args.seeds.split(",")]:
        started = time.perf_counter()
        evaluator = fresh_evaluator(f"pruned-{seed}")
        settings = SearchSettings(
            len(contexts),
            None,
            None,
            f"bench-{seed}",
            args.max_benign_refusal,
            False,
            "tpe",
            args.prune_every,
            0.1,
            seed,
        )
        study, _ = open_study(settings, optuna.storages.InMemoryStorage())
        order = list(contexts)
        random.Random(seed).shuffle(order)
        objective = ContextObjective(
            evaluator, contexts, load_grammar(), search_split, benign, settings
        )
        enqueue_seeds(study, objective.screen(order))
        study.optimize(objective, n_trials=len(contexts))
        found = rank(trial_rows(study), args.max_benign_refusal)
        winner = found[0]["context"]
        used = evaluator.generated["teacher"]
        pruned = sum(r["state"] == "pruned" for r in found)
        skipped = sum(r.get("benign") == "not needed" for r in found)
        stopped = sum(r.get("benign") == "stopped" for r in found)
        verdict = "same" if winner == best else f"p={compare(scores[winner], scores[best]):.3g}"
        shares.append(used / full)
        same += winner == best
        print(
            f"{seed:>4} {used:>11} {used / full:>6.1%} {pruned:>6} {skipped:>7} {stopped:>7} "
            f"{time.perf_counter() - started:>7.0f}  {winner} ({verdict})"
        )
    median = sorted(shares)[len(shares) // 2]
    print(
        f"mean share {sum(shares) / len(shares):.1%}, median {median:.1%}, "
        f"at most a third on {sum(s <= 1 / 3 for s in shares)} of {len(shares)} seeds; "
        f"same winner on {same} of {len(shares)}"
    )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
