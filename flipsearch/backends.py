"""Generation backends. ``hf`` (transformers) is the embedded default.

A generator turns rendered chat prompts into completions, in batches, ``samples`` per prompt.
Results come back batch by batch so the caller can store each batch as soon as it exists: a
killed run loses at most the batch it was in.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from flipsearch.errors import FlipsearchError
from flipsearch.models import LoadedModel


@dataclass(frozen=True)
class Decoding:
    """How responses are drawn: greedy (``temperature == 0``, the paper's choice) or sampled."""

    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise FlipsearchError("max_new_tokens must be at least 1")
        if self.samples < 1:
            raise FlipsearchError("samples must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise FlipsearchError("temperature must be >= 0 and top_p in (0, 1]")
        if self.samples > 1 and self.greedy:
            raise FlipsearchError("several samples need a temperature above 0 (greedy gives one)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def key(self) -> dict[str, Any]:
        """What a cached generation depends on (greedy ignores temperature, top_p and seed)."""
        if self.greedy:
            return {"greedy": True, "max_new_tokens": self.max_new_tokens}
        data = asdict(self)
        data.pop("samples")  # the sample index is its own key field
        return data


@dataclass(frozen=True)
class Generation:
    """One response: its text, its token ids, and whether it stopped or ran out of tokens."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" or "length"


class Generator(Protocol):
    """Anything that generates: the ``hf`` backend here; ``vllm`` and ``openai`` later."""

    fingerprint: str

    def generate_batches(
        self, prompts: Sequence[str], decoding: Decoding
    ) -> Iterator[tuple[list[int], list[list[Generation]]]]:
        """Yield ``(indices into prompts, samples per prompt)`` batch by batch."""
        ...


class HFGenerator:
    """Batched generation with transformers: prompts sorted by length, left padding, seeded."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 32) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.fingerprint = loaded.fingerprint
        self.batch_size = batch_size
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def generate_batches(
        self, prompts: Sequence[str], decoding: Decoding
    ) -> Iterator[tuple[list[int], list[list[Generation]]]]:
        import torch

        if not prompts:
            return
        lengths = [
            len(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        ]
        order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
        # Long prompts first: the largest batch is built (and fails on memory) before any work.
        per_batch = max(1, self.batch_size // decoding.samples)
        for start in range(0, len(order), per_batch):
            indices = order[start : start + per_batch]
            batch = [prompts[i] for i in indices]
            encoded = self.tokenizer(
                batch, return_tensors="pt", padding=True, add_special_tokens=False
            )
            encoded = encoded.to(self.model.device)
            options: dict[str, Any] = {"max_new_tokens": decoding.max_new_tokens}
            if decoding.greedy:
                options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                # Seeded per batch from the batch's first prompt index: the same inputs in the
                # same order reproduce the same samples.
                torch.manual_seed(decoding.seed * 1_000_003 + start)
                options.update(
                    do_sample=True,
                    temperature=decoding.temperature,
                    top_p=decoding.top_p,
                    top_k=None,
                    num_return_sequences=decoding.samples,
                )
            with torch.inference_mode():
                output = self.model.generate(
                    **encoded, pad_token_id=self.tokenizer.pad_token_id, **options
                )
            new_tokens = output[:, encoded["input_ids"].shape[1] :].tolist()
            results: list[list[Generation]] = []
            for row in range(len(batch)):
                samples = new_tokens[row * decoding.samples : (row + 1) * decoding.samples]
                results.append([self._finish(ids) for ids in samples])
            yield indices, results

    def _finish(self, ids: list[int]) -> Generation:
        stop_ids = self._stop_ids()
        cut = next((i for i, token in enumerate(ids) if token in stop_ids), None)
        kept = ids if cut is None else ids[:cut]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Generation(text.strip(), tuple(kept), "length" if cut is None else "stop")

    def _stop_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        stop = set(ids if isinstance(ids, list) else [ids]) if ids is not None else set()
        if self.tokenizer.eos_token_id is not None:
            stop.add(self.tokenizer.eos_token_id)
        return stop
