"""What one long prompt costs everyone else: length-aware batching against padding to the longest.

A prompt set with one very long prompt (a pasted document, say) used to be batched with the
next-longest prompts and padded to its length, so every row of that batch paid for it. This
benchmark generates the same prompts four ways in one run and prints seconds and ratios:

- the short prompts alone (what the long prompt should add to: its own batch);
- short + long, batched the old way (one batch of the longest prompts, padded to the longest);
- short + long, dynamic batching as it is now (a much shorter prompt starts a new batch);
- short + long, batch-invariant batching (the default: one length bucket per batch).

    .venv/bin/python benchmarks/long_prompt.py [--prompts 32 --long-chars 8000]

Padding to the longest grows fast: at 20,000 characters (about 5,000 tokens) the old way needs
tens of GB for attention on a CPU, so the default is a prompt of about 1,700 tokens.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from typing import Any

from flipsearch import Decoding, HFGenerator, load_model, load_prompts
from flipsearch.contexts import Renderer


def padded_to_the_longest(
    order: list[int], lengths: list[int], per_batch: int
) -> Iterator[tuple[int, list[int]]]:
    """The plan before length-aware batching: chunks of the length-sorted prompts."""
    for start in range(0, len(order), per_batch):
        chunk = order[start : start + per_batch]
        yield lengths[chunk[0]], chunk


def seconds(generator: Any, prompts: list[str], decoding: Decoding) -> tuple[float, int]:
    start = time.perf_counter()
    calls = sum(1 for _ in generator.generate_batches(prompts, decoding))
    return time.perf_counter() - start, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--long-chars", type=int, default=8_000)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    loaded = load_model(args.model)
    renderer = Renderer(loaded.tokenizer, args.max_new_tokens)
    texts = [p.text for p in load_prompts("builtin:harmful")[: args.prompts]]
    words = " ".join(p.text for p in load_prompts("builtin:benign"))
    document = (words * (args.long_chars // len(words) + 1))[: args.long_chars]
    long_prompt = f"Summarise this document in one sentence:\n\n{document}"
    short = renderer.render_all(texts, None)
    mixed = [*short, renderer.render(long_prompt, None)]
    tokens = len(loaded.tokenizer(mixed[-1])["input_ids"])
    decoding = Decoding(max_new_tokens=args.max_new_tokens)
    old = HFGenerator(loaded, args.batch_size, batch_invariant=False)
    old._dynamic_plan = padded_to_the_longest  # type: ignore[method-assign]
    ways = [
        ("short prompts alone (dynamic)", HFGenerator(loaded, args.batch_size, False), short),
        ("+ long, padded to the longest (before)", old, mixed),
        ("+ long, length-aware dynamic (now)", HFGenerator(loaded, args.batch_size, False), mixed),
        ("+ long, batch-invariant (default)", HFGenerator(loaded, args.batch_size), mixed),
    ]
    print(
        f"{args.prompts} short prompts and one of {args.long_chars} characters ({tokens} tokens); "
        f"{args.max_new_tokens} new tokens, batch {args.batch_size}, {loaded.dtype}"
    )
    baseline = None
    for name, generator, prompts in ways:
        taken, calls = seconds(generator, prompts, decoding)
        baseline = baseline or taken
        print(f"{name:42} {taken:8.1f} s  {calls:2d} calls  {taken / baseline:5.2f}x alone")


if __name__ == "__main__":
    main()
