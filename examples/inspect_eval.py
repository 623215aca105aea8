"""A teacher flip rate from two inspect_ai runs: the model without and with a context.

    pip install 'flipsearch[inspect]'
    python examples/inspect_eval.py [--model smollm2-135m] [--limit 24]

The same runs from the shell:

    inspect eval flipsearch/unsafe_rate --model flipsearch/smollm2-135m
    inspect eval flipsearch/unsafe_rate --model flipsearch/smollm2-135m -T context=best.yaml

Any inspect model works in place of ``flipsearch/...`` (``hf/...``, ``vllm/...``, an API).
"""

from __future__ import annotations

import argparse

from inspect_ai import eval as inspect_eval
from inspect_ai.model import get_model

import flipsearch
from flipsearch.inspect_tasks import flip_rate_from_logs, unsafe_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--log-dir", default="runs/example-inspect")
    args = parser.parse_args()

    model = get_model(f"flipsearch/{args.model}")  # loaded once, used by both runs
    settings = dict(limit=args.limit, max_new_tokens=args.max_new_tokens)
    common = dict(model=model, log_dir=args.log_dir, display="none")
    [student] = inspect_eval(unsafe_rate(**settings), **common)
    # The best shipped seed on the embedded model, at the placement it was measured at.
    seed = {c.id: c for c in flipsearch.load_contexts()}["refusal-suffix-apology-helpful"]
    with_seed = unsafe_rate(context=seed.text, placement=seed.placement, **settings)
    [teacher] = inspect_eval(with_seed, **common)
    for name, log in (("without context", student), ("with context", teacher)):
        metrics = log.results.scores[0].metrics if log.results else {}
        print(
            f"{name}: unsafe {metrics['rate'].value:.1%} "
            f"[{metrics['ci95_low'].value:.1%}, {metrics['ci95_high'].value:.1%}] "
            f"of {metrics['decided'].value:g} decided, {metrics['invalid'].value:g} invalid"
        )
    result = flip_rate_from_logs(student, teacher)
    print(f"flip rate: {result.flip_rate} (paired McNemar p = {result.p_value:.3g})")


if __name__ == "__main__":
    main()
