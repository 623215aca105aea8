"""Tokens/s of the three backends on the same teacher prompts, measured in one run.

    python benchmarks/generation.py [--model smollm2-135m] [--prompts 64] [--max-new-tokens 48]
                                    [--vllm-python .venv-vllm/bin/python]

Rows:
- ``hf`` at several batch sizes with dynamic batching (sorted by length, padded to the
  longest); the speed-up is over batch size 1.
- Batch invariance: ``hf`` dynamic and batch-invariant (the default) at the largest batch size,
  each with every prompt in one call and with the prompts shuffled into calls of 8 (as a search
  trial asks for them). ``agree`` counts the prompts whose greedy token ids are identical in the
  two compositions; the ratio is tokens/s over dynamic batching with every prompt in one call.
  ``vllm`` gets the same agreement row.
- ``vllm`` (offline engine, in the vLLM environment) with prefix caching on and off, and
  ``openai`` (vLLM's OpenAI-compatible server on 127.0.0.1, 64 requests in flight); their ratio
  is over ``hf`` at the largest batch size.
- Teacher scoring (log-probabilities of given answers under the teacher prompt): ``hf`` one
  forward pass per answer, ``vllm`` with and without the prefix cache, ``openai`` through
  ``echo``; the ratio is over ``hf``.

Every row uses the same rendered teacher prompts (the longest system-message seed context with
each harmful prompt, so the prompts share a prefix), greedy decoding, and the same dtype (bf16
where the CPU has it natively). Scoring rows score the answers ``hf`` generated. The generation
cache is not involved. Without a vLLM environment only the ``hf`` rows are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flipsearch import BackendSpec, Decoding, HFGenerator, load_contexts, load_model, load_prompts
from flipsearch.backends.hf import HFScorer
from flipsearch.contexts import Renderer

ROOT = Path(__file__).resolve().parent.parent


def measure(generator: Any, prompts: list[str], decoding: Decoding) -> tuple[float, int, list]:
    """Seconds, tokens generated, and the first answer's token ids per prompt (prompt order)."""
    start = time.perf_counter()
    tokens = 0
    answers: dict[int, tuple[int, ...]] = {}
    for indices, batch in generator.generate_batches(prompts, decoding):
        tokens += sum(len(g.token_ids) for samples in batch for g in samples)
        answers.update((i, samples[0].token_ids) for i, samples in zip(indices, batch, strict=True))
    return time.perf_counter() - start, tokens, [answers[i] for i in range(len(prompts))]


def shuffled_calls(generator: Any, prompts: list[str], decoding: Decoding, size: int = 8):
    """Seconds, tokens and answers (prompt order) with the prompts shuffled into small calls."""
    import random

    order = list(range(len(prompts)))
    random.Random(0).shuffle(order)
    seconds, tokens, answers = 0.0, 0, [()] * len(prompts)
    for start in range(0, len(order), size):
        part = order[start : start + size]
        took, made, got = measure(generator, [prompts[i] for i in part], decoding)
        seconds, tokens = seconds + took, tokens + made
        for i, ids in zip(part, got, strict=True):
            answers[i] = ids
    return seconds, tokens, answers


def agreement(first: list, second: list) -> str:
    same = sum(a == b for a, b in zip(first, second, strict=True))
    return f"agree {same}/{len(first)} ({same / len(first):.1%})"


def measure_scoring(scorer: Any, requests: list[tuple[str, list[int]]]) -> tuple[float, int]:
    start = time.perf_counter()
    scored = scorer.token_logprobs(requests)
    return time.perf_counter() - start, sum(len(row) for row in scored)


def teacher_prompts(model: str, dtype: str, count: int, max_new: int) -> tuple[Any, list[str]]:
    loaded = load_model(model, dtype=dtype)
    system = [c for c in load_contexts() if c.placement == "system"]
    context = max(system, key=lambda c: len(loaded.tokenizer(c.text)["input_ids"]))
    renderer = Renderer(loaded.tokenizer, max_new)
    harmful = load_prompts("builtin:harmful")[:count]
    return loaded, renderer.render_all([p.text for p in harmful], context)


def vllm_worker(work: Path) -> None:
    """Runs in the vLLM environment: generation and scoring, prefix caching on and off."""
    from flipsearch.backends.vllm import VLLMGenerator

    task = json.loads(work.read_text())
    loaded = load_model(task["model"], dtype=task["dtype"], weights=False)
    decoding = Decoding(max_new_tokens=task["max_new_tokens"])
    requests = [(p, a) for p, a in zip(task["prompts"], task["answers"], strict=True) if a]
    rows = []
    for caching in (True, False):
        generator = VLLMGenerator(loaded, {"enable_prefix_caching": caching}, chunk=10_000)
        measure(generator, task["prompts"][:8], Decoding(max_new_tokens=4))  # warm-up
        seconds, tokens, together = measure(generator, task["prompts"], decoding)
        rows.append(
            ("generate", f"vllm, prefix cache {'on' if caching else 'off'}", seconds, tokens)
        )
        if caching:
            seconds, tokens, apart = shuffled_calls(generator, task["prompts"], decoding)
            name = f"vllm, calls of 8 ({agreement(together, apart)})"
            rows.append(("generate", name, seconds, tokens))
        measure_scoring(generator, requests[:4])  # warm-up
        seconds, tokens = measure_scoring(generator, requests)
        rows.append(("score", f"vllm, prefix cache {'on' if caching else 'off'}", seconds, tokens))
    work.write_text(json.dumps(rows))


def start_server(python: Path, model_dir: str, dtype: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
        "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port),
        "--dtype", dtype, "--enforce-eager",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    import httpx

    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit("the vLLM server exited while starting")
        try:
            if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise SystemExit("the vLLM server did not start in 10 minutes")


def invariance_rows(loaded, rendered, decoding, size, base, together, row) -> None:
    """Dynamic and batch-invariant hf: one call vs shuffled calls of 8, agreement and speed."""
    dynamic = HFGenerator(loaded, batch_size=size, batch_invariant=False)
    seconds, tokens, apart = shuffled_calls(dynamic, rendered, decoding)
    name = f"hf dynamic, calls of 8 ({agreement(together, apart)})"
    row("generate", name, len(rendered), seconds, tokens, base)
    for bucket in (32, 64):
        invariant = HFGenerator(loaded, batch_size=size, length_bucket=bucket)
        seconds, tokens, whole = measure(invariant, rendered, decoding)
        row(
            "generate",
            f"hf invariant, bucket {bucket}, batch {size}",
            len(rendered),
            seconds,
            tokens,
            base,
        )
        seconds, tokens, apart = shuffled_calls(invariant, rendered, decoding)
        name = f"hf invariant, bucket {bucket}, calls of 8 ({agreement(whole, apart)})"
        row("generate", name, len(rendered), seconds, tokens, base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    parser.add_argument("--vllm-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vllm_worker:
        vllm_worker(args.vllm_worker)
        return

    loaded, rendered = teacher_prompts(args.model, args.dtype, args.prompts, args.max_new_tokens)
    decoding = Decoding(max_new_tokens=args.max_new_tokens)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    print(
        f"model {args.model} ({loaded.dtype}), {len(rendered)} teacher prompts, "
        f"{args.max_new_tokens} new tokens, greedy"
    )
    measure(HFGenerator(loaded, batch_size=8), rendered[:8], Decoding(max_new_tokens=4))  # warm-up
    print(
        f"{'what':<9} {'backend':<58} {'prompts':>7} {'tokens':>7} {'s':>7} "
        f"{'tok/s':>8} {'ratio':>7}"
    )

    def row(what: str, backend: str, prompts: int, seconds: float, tokens: int, base: Any):
        """Print a row; ``base`` is the rate the ratio is against (None: this row's own)."""
        rate = tokens / seconds
        base = base or rate
        print(
            f"{what:<9} {backend:<58} {prompts:>7} {tokens:>7} {seconds:>7.1f} {rate:>8.1f} "
            f"{rate / base:>6.2f}x"
        )
        return rate

    one = None
    answers: list = []
    for size in sizes:
        # Batch size 1 on every prompt takes minutes; it runs on a subset (rates compare).
        subset = rendered[: max(size, 16)] if size == 1 else rendered
        dynamic = HFGenerator(loaded, batch_size=size, batch_invariant=False)
        seconds, tokens, got = measure(dynamic, subset, decoding)
        rate = tokens / seconds
        one = one or rate
        hf_rate = row("generate", f"hf dynamic, batch {size}", len(subset), seconds, tokens, one)
        if len(got) == len(rendered):
            answers = got
    invariance_rows(loaded, rendered, decoding, sizes[-1], hf_rate, answers, row)
    requests = [(p, list(a)) for p, a in zip(rendered, answers, strict=True) if a]
    seconds, tokens = measure_scoring(HFScorer(loaded), requests)
    hf_score = row("score", "hf, one pass per answer", len(requests), seconds, tokens, None)

    if not args.vllm_python.exists():
        print(f"(no vLLM environment at {args.vllm_python}: run `make vllm-env` for its rows)")
        return
    model_dir = str(loaded.path)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch) / "work.json"
        work.write_text(
            json.dumps(
                {
                    "model": model_dir,
                    "dtype": loaded.dtype,
                    "max_new_tokens": args.max_new_tokens,
                    "prompts": rendered,
                    "answers": [list(a) for a in answers],
                }
            )
        )
        subprocess.run(
            [str(args.vllm_python), __file__, "--vllm-worker", str(work)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for what, backend, seconds, tokens in json.loads(work.read_text()):
            count = len(rendered) if what == "generate" else len(requests)
            base = hf_rate if what == "generate" else hf_score
            row(what, backend, count, seconds, tokens, base)

    from flipsearch.backends.openai import OpenAIGenerator

    process, url = start_server(args.vllm_python, model_dir, loaded.dtype or "auto")
    try:
        light = load_model(args.model, dtype=args.dtype, weights=False)
        spec = BackendSpec("openai", base_url=(url,), served_model="bench", max_in_flight=64)
        client = OpenAIGenerator(spec, light, chunk=10_000)
        client.check()
        measure(client, rendered[:8], Decoding(max_new_tokens=4))  # warm-up
        seconds, tokens, _ = measure(client, rendered, decoding)
        row(
            "generate",
            "openai (vLLM server), 64 in flight",
            len(rendered),
            seconds,
            tokens,
            hf_rate,
        )
        seconds, tokens = measure_scoring(client, requests)
        row("score", "openai (vLLM server), echo", len(requests), seconds, tokens, hf_score)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
    print("ratios: the first hf rows against hf batch 1; other rows against hf dynamic batch")
    print(f"{sizes[-1]} with every prompt in one call, and")
    print("scoring rows against hf scoring.")


if __name__ == "__main__":  # vLLM's engine spawns processes: scripts need this guard
    sys.exit(main())
