"""What budget forcing costs: a thinking budget (two generation phases) against one plain call.

The embedded model is given a chat template that opens a reasoning block, which it never
closes by itself, so every response is forced closed after the budget. Both ways generate the
same number of tokens per prompt (the budget, the forced close and the answer); the forced way
pays for a second call, whose prompts are longer (the prompt, the reasoning and the close), and
on hf for a re-encoded prompt. Printed: seconds and generated tokens per second of each way,
and their ratio, measured in one run.

    .venv/bin/python benchmarks/budget_forcing.py --backend hf
    .venv-vllm/bin/python benchmarks/budget_forcing.py --backend vllm
    .venv-vllm/bin/python benchmarks/budget_forcing.py --backend openai \\
        --base-url http://127.0.0.1:8000/v1 --served-model smol

(For openai, start a vLLM server on the embedded model first: ``python -m
vllm.entrypoints.openai.api_server --model DIR --served-model-name smol``.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flipsearch import BackendSpec, Decoding, load_model, load_prompts, make_backend
from flipsearch.contexts import Renderer
from flipsearch.models import resolve_model
from flipsearch.reasoning import BudgetForcedGenerator, ReasoningSettings, detect_format
from tests.helpers import reasoning_copy


def timed(generator: Any, prompts: list[str], decoding: Decoding) -> tuple[float, int]:
    """Seconds for all prompts, and the tokens generated."""
    start = time.perf_counter()
    tokens = sum(
        len(g.token_ids)
        for _, batch in generator.generate_batches(prompts, decoding)
        for samples in batch
        for g in samples
    )
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="hf", choices=("hf", "vllm", "openai"))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--answer", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--base-url", default=None)
    parser.add_argument("--served-model", default=None)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="budget-forcing-"))
    model = str(reasoning_copy(resolve_model("smollm2-135m"), folder / "model"))
    options: dict[str, Any] = {}
    if args.backend == "openai":
        options = {"base_url": (args.base_url,), "served_model": args.served_model}
    spec = BackendSpec(args.backend, **options)
    loaded = load_model(model, dtype="fp32", weights=spec.needs_weights)
    generator, _ = make_backend(spec, loaded, args.batch_size)
    fmt = detect_format(loaded.tokenizer, ReasoningSettings())
    forced = BudgetForcedGenerator(generator, loaded.tokenizer, fmt, args.budget, args.batch_size)
    renderer = Renderer(loaded.tokenizer, args.budget + args.answer + 8)
    texts = [p.text for p in load_prompts("builtin:harmful")[: args.prompts]]
    prompts = renderer.render_all(texts)
    total = args.budget + len(forced.close_ids) + args.answer
    timed(generator, prompts[:2], Decoding(4))  # warm-up: kernels, engine, connections
    # Each way twice, interleaved, the faster of each kept: the order does not favour one.
    plain_s, plain_tokens = timed(generator, prompts, Decoding(total))
    forced_s, forced_tokens = timed(forced, prompts, Decoding(args.answer))
    plain_s = min(plain_s, timed(generator, prompts, Decoding(total))[0])
    forced_s = min(forced_s, timed(forced, prompts, Decoding(args.answer))[0])
    print(f"backend {args.backend}, {len(prompts)} prompts, greedy, fp32")
    close = len(forced.close_ids)
    print(f"budget {args.budget} reasoning + {close} close + {args.answer} answer tokens")
    print(f"{'way':<28}{'seconds':>9}{'tokens':>9}{'tok/s':>9}")
    for name, seconds, tokens in (
        ("plain (one call)", plain_s, plain_tokens),
        ("budget-forced (two phases)", forced_s, forced_tokens),
    ):
        print(f"{name:<28}{seconds:>9.1f}{tokens:>9}{tokens / seconds:>9.1f}")
    ratio = (forced_s / forced_tokens) / (plain_s / plain_tokens)
    print(f"budget forcing costs {ratio:.2f}x the time per generated token of one plain call")


if __name__ == "__main__":  # vLLM's engine spawns processes: scripts need this guard
    main()
