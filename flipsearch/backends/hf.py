"""The ``hf`` backend: transformers in this process (the embedded default; CPU or CUDA)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from flipsearch.backends._base import Decoding, Generation, finish, stop_token_ids
from flipsearch.errors import FlipsearchError
from flipsearch.models import LoadedModel

Options = None  # hf takes the model, device, dtype and batch size every backend gets


def create(loaded: LoadedModel, options: None, batch_size: int) -> tuple[HFGenerator, HFScorer]:
    return HFGenerator(loaded, batch_size), HFScorer(loaded)


class HFGenerator:
    """Batched generation with transformers: prompts sorted by length, left padding, seeded."""

    def __init__(self, loaded: LoadedModel, batch_size: int = 32) -> None:
        if loaded.model is None:
            raise FlipsearchError(
                f"the hf backend runs the model in this process, but {loaded.name!r} was "
                "loaded without its weights"
            )
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.fingerprint = loaded.fingerprint
        self.batch_size = batch_size
        self.stop_ids = stop_token_ids(self.tokenizer, self.model.generation_config)
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
        return finish(self.tokenizer, ids, self.stop_ids)


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
