"""The ``hf`` backend: transformers in this process (the embedded default; CPU or CUDA).

Batch-invariant by default: a prompt's answer depends only on the prompt, the model, the
decoding and the seed, never on what it was batched with. Two things make a row's arithmetic
change with its batch: the padded length (attention reduces over it; kernels pick their
blocking by shape) and the number of rows (matrix kernels choose reduction strategies by it).
So every prompt is left-padded to its length bucket (a multiple of ``length_bucket`` tokens)
and a batch holds prompts of one bucket only. On CUDA every batch also has the same number of
rows (a short batch is filled with copies of its last prompt, answers thrown away): GPU matrix
kernels pick their reduction strategy by the row count, and so do a CPU's bf16 kernels (with
AMX, one row and four gave different greedy answers). Only in fp32 on a CPU was the row count
measured not to change an answer (tests/test_batch_invariance.py checks it on every run, bf16
and fp32), so only there do batches hold just the rows they need (``invariant_rows=auto``);
``fixed`` fills them anyway.
Sampling draws each row from its own generator seeded by the prompt (``request_seed``), as
vllm and openai do.
The price is padding (and filler rows); ``benchmarks/generation.py`` measures it, and
``--no-batch-invariant`` gives back plain dynamic batching (sorted by length, padded to the
longest, seeded per batch), which the cache keys apart.
"""

from __future__ import annotations

from collections import defaultdict
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
    """The hf backend's own settings (it also takes the model, device, dtype and batch size)."""

    batch_invariant: bool = field(
        default=True,
        metadata=option(
            "hf: generate at fixed shapes (length buckets; on CUDA a fixed number of rows) "
            "with per-prompt sampling seeds, so an answer never depends on its batch; "
            "--no-batch-invariant batches dynamically (answers may change with batch company)."
        ),
    )
    length_bucket: int = field(
        default=32,
        metadata=option(
            "hf, batch-invariant: prompts are left-padded to a multiple of this many tokens.",
            min=1,
        ),
    )
    invariant_rows: str = field(
        default="auto",
        metadata=option(
            "hf, batch-invariant: 'fixed' fills every batch to --batch-size rows; 'as-needed' "
            "does not; 'auto' fills except in fp32 on a CPU (the only case where the row "
            "count was measured not to change answers).",
        ),
    )

    def __post_init__(self) -> None:
        check_row_mode(self.invariant_rows)  # before the model loads


ROW_MODES = ("auto", "fixed", "as-needed")


def check_row_mode(value: str) -> None:
    if value not in ROW_MODES:
        raise FlipsearchError(
            f"--invariant-rows must be one of {', '.join(ROW_MODES)}, got {value!r}"
        )


def create(loaded: LoadedModel, options: Options | None, batch_size: int) -> tuple[Any, Any]:
    options = options or Options()
    generator = HFGenerator(
        loaded,
        batch_size,
        options.batch_invariant,
        options.length_bucket,
        options.invariant_rows,
    )
    return generator, HFScorer(loaded)


class HFGenerator:
    """Batched generation with transformers, batch-invariant unless told otherwise."""

    def __init__(
        self,
        loaded: LoadedModel,
        batch_size: int = 32,
        batch_invariant: bool = True,
        length_bucket: int = 32,
        invariant_rows: str = "auto",
    ) -> None:
        if loaded.model is None:
            raise FlipsearchError(
                f"the hf backend runs the model in this process, but {loaded.name!r} was "
                "loaded without its weights"
            )
        if batch_size < 1 or length_bucket < 1:
            raise FlipsearchError("batch size and length bucket must be at least 1")
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.max_length = loaded.max_length
        self.batch_size = batch_size
        self.batch_invariant = batch_invariant
        self.length_bucket = length_bucket
        check_row_mode(invariant_rows)
        on_gpu = getattr(self.model.device, "type", "cpu") == "cuda"
        # bf16 on a CPU with AMX changed answers with the row count (1 row vs 4: 2 of 12
        # greedy answers, tests/test_batch_invariance.py); fp32 on a CPU did not.
        full_precision = str(getattr(self.model, "dtype", "")) == "torch.float32"
        self.fixed_rows = invariant_rows == "fixed" or (
            invariant_rows == "auto" and (on_gpu or not full_precision)
        )
        # Invariant answers depend on the fixed shapes, so they are cached apart.
        self.fingerprint = loaded.fingerprint
        if batch_invariant:
            rows = f"x{batch_size}" if self.fixed_rows else ""
            self.fingerprint += f":hf-invariant:{length_bucket}{rows}"
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def mode(self) -> str:
        """How answers were batched, in words (the report states it)."""
        if self.batch_invariant:
            rows = f"{self.batch_size} rows per batch" if self.fixed_rows else "rows as needed"
            return (
                f"batch-invariant (prompts padded to multiples of {self.length_bucket} "
                f"tokens, {rows}, per-prompt sampling seeds)"
            )
        return f"dynamic batching (up to {self.batch_size} rows, padded to the longest)"

    def generate_batches(
        self, prompts: Sequence[str], decoding: Decoding
    ) -> Iterator[tuple[list[int], list[list[Generation]]]]:
        if not prompts:
            return
        encoded = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        per_batch = max(1, self.batch_size // decoding.samples)
        for length, indices in self._plan([len(ids) for ids in encoded], per_batch):
            rows = [encoded[i] for i in indices for _ in range(decoding.samples)]
            if not self.batch_invariant:  # one seed for the batch
                seeds = [decoding.seed * 1_000_003 + indices[0]]
            else:  # one per row: the prompt's, and the sample's index
                seeds = [
                    request_seed(decoding.seed, prompts[i]) * 1_000_003 + k
                    for i in indices
                    for k in range(decoding.samples)
                ]
            if self.batch_invariant and self.fixed_rows:  # filler rows, answers discarded
                rows += [rows[-1]] * (self.batch_size - len(rows))
                seeds += [seeds[-1]] * (self.batch_size - len(seeds))
            new_tokens = self._generate(rows, length, decoding, seeds)
            results = [
                [
                    self._finish(ids)
                    for ids in new_tokens[r * decoding.samples :][: decoding.samples]
                ]
                for r in range(len(indices))
            ]
            yield indices, results

    def generate_ids(
        self,
        rows: Sequence[Sequence[int]],
        decoding: Decoding,
        seeds: Sequence[int],
        max_tokens: Sequence[int],
    ) -> list[Generation]:
        """One continuation of each token-id row, at most ``max_tokens[i]`` tokens, sampled
        with ``seeds[i]`` (budget forcing continues responses this way). Batched by the same
        plan as ``generate_batches``, so it is batch-invariant the same way."""
        results: list[Generation | None] = [None] * len(rows)
        for length, indices in self._plan([len(r) for r in rows], self.batch_size):
            batch = [list(rows[i]) for i in indices]
            batch_seeds = [int(seeds[i]) for i in indices]
            if self.batch_invariant and self.fixed_rows:  # filler rows, answers discarded
                batch += [batch[-1]] * (self.batch_size - len(batch))
                batch_seeds += [batch_seeds[-1]] * (self.batch_size - len(batch_seeds))
            longest = max(max_tokens[i] for i in indices)
            step = Decoding(longest, decoding.temperature, decoding.top_p, 1, decoding.seed)
            new_tokens = self._generate(batch, length, step, batch_seeds)
            for i, ids in zip(indices, new_tokens, strict=False):
                # Greedy and per-row sampling do not depend on how far a row goes on.
                results[i] = self._finish(ids[: max_tokens[i]])
        return [r for r in results if r is not None]

    def _plan(self, lengths: list[int], per_batch: int) -> Iterator[tuple[int, list[int]]]:
        """Batches as (padded length, prompt indices), the longest first (a batch too large for
        memory fails before any work). Invariant: one length bucket per batch."""
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
        if not self.batch_invariant:
            yield from self._dynamic_plan(order, lengths, per_batch)
            return
        buckets: dict[int, list[int]] = defaultdict(list)
        for i in order:
            buckets[self._bucket(lengths[i])].append(i)
        for length in sorted(buckets, reverse=True):
            members = buckets[length]
            for start in range(0, len(members), per_batch):
                yield length, members[start : start + per_batch]

    @staticmethod
    def _dynamic_plan(
        order: list[int], lengths: list[int], per_batch: int
    ) -> Iterator[tuple[int, list[int]]]:
        """Batches padded to their longest prompt; a much shorter prompt (more than half of
        its row and over 128 tokens would be padding) starts a new batch, so one long prompt
        costs its own batch rather than everyone's."""
        batch: list[int] = []
        for i in order:
            longest = lengths[batch[0]] if batch else 0
            padding = longest - lengths[i]
            if batch and (len(batch) == per_batch or (padding > 128 and 2 * padding > longest)):
                yield longest, batch
                batch = []
            batch.append(i)
        if batch:
            yield lengths[batch[0]], batch

    def _bucket(self, length: int) -> int:
        rounded = -(-length // self.length_bucket) * self.length_bucket
        return min(rounded, max(length, self.max_length or rounded))

    def _generate(
        self, rows: list[list[int]], length: int, decoding: Decoding, seeds: list[int]
    ) -> list[list[int]]:
        """New token ids of every row, each row left-padded to ``length``."""
        import torch
        from transformers import LogitsProcessorList

        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for r, ids in enumerate(rows):
            input_ids[r, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention[r, length - len(ids) :] = 1
        options: dict[str, Any] = {
            "max_new_tokens": decoding.max_new_tokens,
            "do_sample": False,
            "temperature": None,
            "top_p": None,
            "top_k": None,
        }
        if not decoding.greedy and self.batch_invariant:
            sampler = RowSampler(seeds, decoding.temperature, decoding.top_p)
            options["logits_processor"] = LogitsProcessorList([sampler])
        elif not decoding.greedy:
            torch.manual_seed(seeds[0])  # per batch: the same call reproduces its samples
            options.update(do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p)
        device = self.model.device
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                pad_token_id=pad,
                **options,
            )
        return output[:, length:].tolist()

    def _finish(self, ids: list[int]) -> Generation:
        return finish(self.tokenizer, ids, self.stop_ids)


class RowSampler:
    """A logits processor that samples every row from its own seeded generator and leaves only
    the drawn token, so generate's greedy step takes it: a row's sample depends on its own
    seed, never on its neighbours or its place in the batch."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float) -> None:
        from transformers import TemperatureLogitsWarper, TopPLogitsWarper

        self.seeds = seeds
        self.generators: list[Any] = []
        self.warpers: list[Any] = [TemperatureLogitsWarper(temperature)]
        if top_p < 1:
            self.warpers.append(TopPLogitsWarper(top_p))

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if not self.generators:
            self.generators = [
                torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds
            ]
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        drawn = torch.stack(
            [torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(self.generators)]
        )
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, drawn, 0.0)


class HFScorer:
    """Teacher scoring with transformers, one forward pass per (prompt, continuation)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded

    def token_logprobs(self, requests: Sequence[tuple[str, Sequence[int]]]) -> list[list[float]]:
        import torch

        from flipsearch.scoring import response_logits

        results = []
        for prompt, continuation in requests:
            ids = self.loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            logprobs = torch.log_softmax(response_logits(self.loaded, ids, continuation), -1)
            index = torch.tensor(list(continuation), device=logprobs.device).unsqueeze(-1)
            results.append(logprobs.gather(-1, index).squeeze(-1).tolist())
        return results
