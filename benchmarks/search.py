"""The pruned search vs exhaustive scoring, one trial at a time vs many in flight, on two prompt
collections and two backends, measured in one run.

    python benchmarks/search.py [--backends hf,vllm] [--limit 40] [--max-new-tokens 24]
                                [--vllm-python .venv-vllm/bin/python] [--work DIR]

For each backend and each collection (the shipped sets, and collection B in
``benchmarks/collections/b``, written to be unlike them and used only for measuring):

- ``exhaustive`` scores every seed context on the whole search split and benign set; its
  leaderboard's winner is the reference.
- ``sequential`` runs the study as flipsearch did before trials shared calls: one trial in
  flight, each call only the chunk it asks for.
- ``concurrent`` keeps ``ceil(batch / prune-every)`` trials in flight (``--trials-in-flight
  0``), serves them in shared calls and tops each call up to whole batches with what the
  trials will likely ask for next.

Both searches start from a cache holding only the student's answers, run every seed as a trial
(the screen first), and use the same pruner, so their teacher generations are what they really
generated (batch fillers included). ``winner`` is ``same`` or the exact McNemar p of the found
winner against the exhaustive one on the exhaustive scores (paired, same prompts). ``calls``
is the mean number of prompts per generation call after the screen, beside its share of the
batch size. ``speed-up`` is the sequential search's wall time over this one's. ``verdicts``
counts the seeds whose trial ended as it did in the sequential search (state, flips and
prompts scored): concurrency should change none.

``--replay`` answers the searches from the exhaustive cache instead of generating (the same
answers: they do not depend on batch company), for their generations, calls and winners in
seconds; their wall times are then not measured. Rows print as they are measured, and the
whole table again at the end.

The vLLM rows run in the vLLM environment (a child process of this script, one after the
other: never two engines at once).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

from flipsearch import (
    BackendSpec,
    Decoding,
    Evaluator,
    GenerationCache,
    load_contexts,
    load_model,
    load_prompts,
    make_backend,
)
from flipsearch.backends.cache import cache_key
from flipsearch.fliprate import compare
from flipsearch.grammar import load_grammar
from flipsearch.leaderboard import Row, rank
from flipsearch.prompts import split_harmful, stratified_order
from flipsearch.scheduler import Limits, run_trials
from flipsearch.search import (
    ContextObjective,
    SearchSettings,
    enqueue_seeds,
    open_study,
    trial_rows,
)

HERE = Path(__file__).resolve().parent
COLLECTIONS = {
    "shipped": ("builtin:harmful", "builtin:benign"),
    "B": (str(HERE / "collections/b/harmful.jsonl"), str(HERE / "collections/b/benign.jsonl")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=40, help="prompts of each kind")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prune-every", type=int, default=8)
    parser.add_argument("--max-benign-refusal", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm-python", default=str(HERE.parent / ".venv-vllm/bin/python"))
    parser.add_argument("--work", default=None, help="keep caches here (exhaustive ones reused)")
    parser.add_argument(
        "--methods", default="sequential,concurrent", help="searches to run ('' for none)"
    )
    parser.add_argument(
        "--replay",
        action="store_true",
        help="searches replay the exhaustive answers instead of generating: their teacher "
        "generations, calls and winners are measured, their wall times are not",
    )
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)  # a child's results
    args = parser.parse_args()
    unknown = {m for m in args.methods.split(",") if m} - {"sequential", "concurrent"}
    if unknown:
        parser.error(f"--methods: unknown {', '.join(sorted(unknown))} (sequential, concurrent)")
    work = Path(args.work or tempfile.mkdtemp(prefix="flipsearch-search-bench-"))
    rows: list[dict[str, Any]] = []
    if args.json is None:
        print_header(args)
    for backend in args.backends.split(","):
        if backend == "vllm" and args.json is None:
            rows += _in_vllm_env(args, work)
            continue
        for name in COLLECTIONS:
            rows += measure(backend, name, args, work / backend / name)
    if args.json is not None:
        Path(args.json).write_text(json.dumps(rows))
        return
    print("\nAll rows:")
    print_table(rows, args)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


def _in_vllm_env(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    if not Path(args.vllm_python).is_file():
        print(f"(no vLLM environment at {args.vllm_python}: vllm rows skipped)")
        return []
    out = work / "vllm.json"
    options = [
        *("model", "limit", "max_new_tokens", "batch_size", "prune_every"),
        *("max_benign_refusal", "seed", "methods"),
    ]
    argv = [
        x for name in options for x in (f"--{name.replace('_', '-')}", str(getattr(args, name)))
    ]
    command = [args.vllm_python, __file__, *argv, "--work", str(work), "--backends", "vllm"]
    command += ["--json", str(out), *(["--replay"] if args.replay else [])]
    subprocess.run(command, check=True)
    rows: list[dict[str, Any]] = json.loads(out.read_text())
    return rows


def measure(backend: str, collection: str, args: argparse.Namespace, work: Path) -> list[dict]:
    """Exhaustive, sequential and concurrent on one collection with one backend."""
    work.mkdir(parents=True, exist_ok=True)
    harmful_source, benign_source = COLLECTIONS[collection]
    harmful = stratified_order(load_prompts(harmful_source, "harmful"), args.seed)[: args.limit]
    benign = stratified_order(load_prompts(benign_source, "benign"), args.seed)[: args.limit]
    search_split, _ = split_harmful(harmful, 0.3, seed=args.seed)
    contexts = load_contexts()
    spec = BackendSpec(backend)
    loaded = load_model(args.model, dtype="fp32", weights=spec.needs_weights)
    generator, _ = make_backend(spec, loaded, args.batch_size)
    decoding = Decoding(max_new_tokens=args.max_new_tokens)

    def evaluator(name: str) -> Evaluator:
        return Evaluator(
            loaded,
            decoding=decoding,
            generator=generator,
            batch_size=args.batch_size,
            cache=GenerationCache(work / f"{name}.sqlite"),
        )

    student_cache = work / "student.sqlite"
    if not student_cache.exists():
        student = evaluator("student")
        student.prefetch([*search_split, *benign], None)
        student.cache.close()  # type: ignore[union-attr]
    exhaustive = _fresh(work, "exhaustive", keep=True)
    started = time.perf_counter()
    scorer = evaluator(exhaustive)
    # Every (context, prompt) pair in one pass of full batches, then scored from the cache.
    scorer.prefetch_many([([*search_split, *benign], c) for c in contexts], "exhaustive")
    scores = {c.id: scorer.score(c, search_split, benign, "search") for c in contexts}
    exhaustive_s = time.perf_counter() - started
    best = rank([Row.of_score(s) for s in scores.values()], args.max_benign_refusal)[0]
    full = len(contexts) * (len(search_split) + len(benign))
    results = [
        {
            "backend": backend,
            "collection": collection,
            "method": "exhaustive",
            "prompts": f"{len(search_split)} search, {len(benign)} benign",
            "pool": None,
            "generations": full,
            "full": full,
            "winner": best["context"],
            "p": None,
            "seconds": exhaustive_s if scorer.generated["teacher"] else None,
            "calls": None,
        }
    ]
    methods = {
        "sequential": (1, 1),
        "concurrent": (math.ceil(args.batch_size / args.prune_every), args.batch_size),
    }
    for method in [m for m in args.methods.split(",") if m]:
        in_flight, fill = methods[method]
        searcher = evaluator(_fresh(work, method))
        if args.replay:
            searcher.generator = Replay(generator.fingerprint, scorer.cache, args.batch_size)
        found = _search(
            searcher,
            contexts,
            search_split,
            benign,
            args,
            Limits(len(contexts), in_flight=in_flight, batch_size=fill),
        )
        if args.replay:
            found["seconds"] = None
        winner = found["winner"]
        p = None if winner == best["context"] else compare(scores[winner], scores[best["context"]])
        results.append(
            {
                "backend": backend,
                "collection": collection,
                "method": method,
                "full": full,
                "p": p,
                **found,
            }
        )
        alone = next((r for r in results if r["method"] == "sequential"), None)
        if alone is not None and method != "sequential":
            same = alone["verdicts"].items()
            results[-1]["same_verdicts"] = sum(found["verdicts"].get(c) == v for c, v in same)
    for row in results:
        print_row(row, results, args)
    return results


class Replay:
    """A generator that answers from a cache holding every answer (``--replay``): a search's
    decisions and calls without its generation time (answers do not depend on batch company,
    so they are the ones the backend would give)."""

    def __init__(self, fingerprint: str, cache: Any, batch_size: int) -> None:
        self.fingerprint, self.cache, self.batch_size = fingerprint, cache, batch_size

    def generate_batches(self, prompts, decoding):
        for start in range(0, len(prompts), self.batch_size):
            part = list(range(start, min(len(prompts), start + self.batch_size)))
            keys = {
                i: [
                    cache_key(self.fingerprint, prompts[i], decoding, s)
                    for s in range(decoding.samples)
                ]
                for i in part
            }
            found = self.cache.get_many([k for ks in keys.values() for k in ks])
            missing = [i for i in part if any(k not in found for k in keys[i])]
            if missing:
                raise SystemExit(
                    f"--replay: {len(missing)} answers are not in the exhaustive cache"
                )
            yield part, [[found[k] for k in keys[i]] for i in part]


def _fresh(work: Path, name: str, keep: bool = False) -> str:
    """A cache holding only the student's answers (``keep``: an earlier one is reused)."""
    path = work / f"{name}.sqlite"
    if keep and path.exists():
        return name
    for suffix in ("", "-wal", "-shm"):  # a stale log beside a fresh copy corrupts it
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    shutil.copy(work / "student.sqlite", path)
    return name


def _search(evaluator: Evaluator, contexts, search_split, benign, args, limits) -> dict:
    settings = SearchSettings(
        len(contexts),
        None,
        None,
        "bench",
        args.max_benign_refusal,
        False,
        "tpe",
        args.prune_every,
        0.1,
        args.seed,
        in_flight=limits.in_flight,
        batch_size=limits.batch_size,
    )
    started = time.perf_counter()
    objective = ContextObjective(
        evaluator, contexts, load_grammar(), search_split, benign, settings
    )
    storage = optuna.storages.InMemoryStorage()
    study, _ = open_study(settings, storage)
    enqueue_seeds(study, objective.screen(contexts))
    screened = len(evaluator.calls)
    run_trials(study, storage, objective, limits)
    seconds = time.perf_counter() - started
    found = rank(trial_rows(study), args.max_benign_refusal)
    verdicts = {
        r["context"]: [
            r["state"],
            r["flip_rate_count"],
            r["flip_rate_n"],
            r.get("benign_refusal_n"),
        ]
        for r in found
    }
    calls = [n for role, n in evaluator.calls[screened:] if role == "teacher"]
    return {
        "prompts": None,
        "pool": len(objective.pool),
        "generations": evaluator.generated["teacher"],
        "winner": found[0]["context"],
        "pruned": sum(r["state"] == "pruned" for r in found),
        "seconds": seconds,
        "calls": sum(calls) / len(calls) if calls else None,
        "verdicts": verdicts,
    }


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print_header(args)
    for row in rows:
        print_row(row, rows, args)


def print_header(args: argparse.Namespace) -> None:
    print(
        f"{len(load_contexts())} seed contexts, every one a trial; {args.limit} prompts of "
        f"each kind per collection (30% of the harmful ones held out); {args.max_new_tokens} "
        f"new tokens, greedy, fp32; batch size {args.batch_size}, pruning every "
        f"{args.prune_every} prompts"
    )
    print(
        f"{'backend':<7} {'collection':<10} {'method':<10} {'teacher gens':>12} "
        f"{'share':>6} {'seconds':>8} {'speed-up':>8} {'prompts/call':>14} {'verdicts':>8}  winner",
        flush=True,
    )


def print_row(r: dict[str, Any], rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    base = next(
        (
            x["seconds"]
            for x in rows
            if x["method"] == "sequential"
            and (x["backend"], x["collection"]) == (r["backend"], r["collection"])
        ),
        None,
    )
    if r["method"] == "exhaustive":
        print(f"{r['backend']:<7} {r['collection']:<10} ({r['prompts']}; winner {r['winner']})")
    share = r["generations"] / r["full"]
    seconds = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
    speed = "-"
    if r["method"] != "exhaustive" and base and r["seconds"]:
        speed = f"{base / r['seconds']:.2f}x"
    calls = "-"
    if r["calls"] is not None:
        calls = f"{r['calls']:.1f} ({r['calls'] / args.batch_size:.0%})"
    verdicts = "-"
    if r.get("same_verdicts") is not None:
        verdicts = f"{r['same_verdicts']}/{len(r['verdicts'])}"
    winner = r["winner"] if r["p"] is None else f"{r['winner']} (McNemar p={r['p']:.3g})"
    if r["method"] != "exhaustive" and r["p"] is None:
        winner = "same"
    print(
        f"{r['backend']:<7} {r['collection']:<10} {r['method']:<10} {r['generations']:>12} "
        f"{share:>6.1%} {seconds:>8} {speed:>8} {calls:>14} {verdicts:>8}  {winner}",
        flush=True,
    )


if __name__ == "__main__":
    main()
