"""Generation backends: ``hf`` (transformers, the embedded default), ``vllm``, ``openai``.

A generator turns rendered chat prompts into completions, in batches, ``samples`` per prompt.
Results come back batch by batch so the caller can store each batch as soon as it exists: a
killed run loses at most the batch it was in. A scorer returns the log-probability of each token
of a given continuation after a given prompt (teacher scoring).

Every backend receives the prompt flipsearch rendered with the model's own chat template (the
``openai`` backend's ``chat`` endpoint excepted), so what the model sees is byte-identical
across backends; only the numerics differ, which is why the backend is part of the cache key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
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
    """Anything that generates: ``HFGenerator``, ``VLLMGenerator``, ``OpenAIGenerator``."""

    fingerprint: str

    def generate_batches(
        self, prompts: Sequence[str], decoding: Decoding
    ) -> Iterator[tuple[list[int], list[list[Generation]]]]:
        """Yield ``(indices into prompts, samples per prompt)`` batch by batch."""
        ...


class Scorer(Protocol):
    """Per-token log-probabilities of given continuations (teacher scoring)."""

    def token_logprobs(self, requests: Sequence[tuple[str, Sequence[int]]]) -> list[list[float]]:
        """For each (rendered prompt, continuation token ids): log p of every continuation
        token given the prompt and the tokens before it."""
        ...


BACKENDS = ("hf", "vllm", "openai")


@dataclass(frozen=True)
class BackendSpec:
    """Which backend generates, and how to reach it. The API key is read from the environment
    variable named here when requests are made; it is never stored."""

    name: str = "hf"
    base_urls: tuple[str, ...] = ()  # openai: one or more servers, used round-robin
    served_model: str | None = None  # openai: the model name the server knows (default: model)
    api_key_env: str = "OPENAI_API_KEY"
    endpoint: str = "completions"  # openai: completions (rendered prompt) or chat (messages)
    max_in_flight: int = 32
    request_timeout: float = 300.0
    retries: int = 4
    engine_args: dict[str, Any] = field(default_factory=dict)  # vllm: extra LLM(...) arguments

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise FlipsearchError(
                f"unknown backend {self.name!r}; choose one of {', '.join(BACKENDS)}"
            )
        if self.endpoint not in ("completions", "chat"):
            raise FlipsearchError(
                f"unknown openai endpoint {self.endpoint!r}; choose completions or chat"
            )
        if self.name == "openai" and not self.base_urls:
            raise FlipsearchError(
                "the openai backend needs a server: --base-url http://HOST:PORT/v1 (repeatable)"
            )
        if self.name != "openai" and self.base_urls:
            raise FlipsearchError("--base-url is for --backend openai")
        if self.engine_args and self.name != "vllm":
            raise FlipsearchError("--vllm-arg is for --backend vllm")
        if self.max_in_flight < 1 or self.retries < 0 or self.request_timeout <= 0:
            raise FlipsearchError(
                "max_in_flight must be >= 1, retries >= 0 and request_timeout > 0"
            )

    @property
    def needs_weights(self) -> bool:
        """Only ``hf`` runs the model in this process; the others need just its tokenizer."""
        return self.name == "hf"


def make_backend(
    spec: BackendSpec, loaded: LoadedModel, batch_size: int = 64
) -> tuple[Generator, Scorer]:
    """The generator and scorer of ``spec`` for ``loaded`` (weights, or only its tokenizer)."""
    if spec.name == "hf":
        return HFGenerator(loaded, batch_size), HFScorer(loaded)
    if spec.name == "vllm":
        from flipsearch.vllm_backend import VLLMGenerator

        vllm_generator = VLLMGenerator(loaded, spec.engine_args, chunk=max(batch_size, 64))
        return vllm_generator, vllm_generator
    from flipsearch.openai_backend import OpenAIGenerator

    openai_generator = OpenAIGenerator(spec, loaded, chunk=max(batch_size, 64))
    openai_generator.check()
    return openai_generator, openai_generator


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """The ids that end a response: the generation config's EOS ids and the tokenizer's."""
    ids = getattr(generation_config, "eos_token_id", None) if generation_config else None
    stop = set(ids if isinstance(ids, list) else [ids]) if ids is not None else set()
    if tokenizer.eos_token_id is not None:
        stop.add(tokenizer.eos_token_id)
    return stop


def finish(tokenizer: Any, ids: Sequence[int], stop_ids: set[int]) -> Generation:
    """A response cut before its first stop token, decoded the same way for every backend."""
    cut = next((i for i, token in enumerate(ids) if token in stop_ids), None)
    kept = list(ids if cut is None else ids[:cut])
    text = tokenizer.decode(kept, skip_special_tokens=True)
    return Generation(text.strip(), tuple(kept), "length" if cut is None else "stop")


def request_seed(seed: int, prompt: str) -> int:
    """A per-prompt sampling seed: a response does not depend on what it was batched with."""
    digest = hashlib.sha256(f"{seed}\n{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


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
