"""Tokens/s of the hf backend: batched vs one prompt at a time, measured in the same run.

    python benchmarks/generation.py [--model smollm2-135m] [--prompts 64] [--max-new-tokens 48]

Prints one row per batch size and the speed-up over batch size 1. Uses teacher prompts (a seed
context with each harmful prompt), as the search does; the cache is not involved.
"""

from __future__ import annotations

import argparse
import time

from flipsearch import Decoding, HFGenerator, load_contexts, load_model, load_prompts
from flipsearch.contexts import Renderer


def measure(generator: HFGenerator, prompts: list[str], decoding: Decoding) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = 0
    for _, batch in generator.generate_batches(prompts, decoding):
        tokens += sum(len(g.token_ids) for samples in batch for g in samples)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    args = parser.parse_args()

    loaded = load_model(args.model, dtype=args.dtype)
    context = load_contexts()[0]
    renderer = Renderer(loaded.tokenizer, args.max_new_tokens)
    harmful = load_prompts("builtin:harmful")[: args.prompts]
    rendered = renderer.render_all([p.text for p in harmful], context)
    decoding = Decoding(max_new_tokens=args.max_new_tokens)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    # Batch size 1 on every prompt takes minutes; it runs on a subset and is scaled by tokens/s.
    print(
        f"model {args.model} ({str(loaded.model.dtype).removeprefix('torch.')}), "
        f"{len(rendered)} teacher prompts, {args.max_new_tokens} new tokens, greedy"
    )
    measure(HFGenerator(loaded, batch_size=8), rendered[:8], Decoding(max_new_tokens=4))  # warm-up
    print(f"{'batch':>6} {'prompts':>8} {'tokens':>8} {'seconds':>8} {'tok/s':>8} {'speed-up':>9}")
    baseline = None
    for size in sizes:
        subset = rendered[: max(size, 16)] if size == 1 else rendered
        seconds, tokens = measure(HFGenerator(loaded, batch_size=size), subset, decoding)
        rate = tokens / seconds
        baseline = baseline or rate
        print(
            f"{size:>6} {len(subset):>8} {tokens:>8} {seconds:>8.1f} {rate:>8.1f} "
            f"{rate / baseline:>8.2f}x"
        )


if __name__ == "__main__":
    main()
