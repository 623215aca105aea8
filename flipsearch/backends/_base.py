"""The backends' contract: what a generator and a scorer are, and the helpers all share.

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
    # The stop token the model sampled (not in token_ids). Known for fresh generations only
    # (the cache does not keep it), so it takes no part in comparing two answers.
    stop_token: int | None = field(default=None, compare=False)


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
    if cut is None:
        return Generation(text.strip(), tuple(kept), "length")
    return Generation(text.strip(), tuple(kept), "stop", ids[cut])


def request_seed(seed: int, prompt: str) -> int:
    """A per-prompt sampling seed: a response does not depend on what it was batched with."""
    digest = hashlib.sha256(f"{seed}\n{prompt}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def option(
    help: str, flag: str | None = None, key_values: bool = False, **typer_options: Any
) -> dict[str, Any]:
    """Field metadata of a setting: its help text, its CLI flag (default: from its name), and
    ``key_values`` for a dict given on the command line as repeated ``KEY=VALUE``.

    The CLI builds one ``--flag`` per setting from this, so a setting is declared once, with its
    default, where it belongs (a backend's options in that backend's file).
    """
    return {"help": help, "flag": flag, "key_values": key_values, "typer": typer_options}


class BackendFactory(Protocol):
    """What a backend module's ``create`` looks like (the registry in ``__init__`` calls it).

    ``options`` is the module's ``Options`` (None for a backend without options).
    """

    def __call__(self, loaded: Any, options: Any, batch_size: int) -> tuple[Generator, Scorer]: ...
