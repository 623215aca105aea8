"""The ``openai`` backend: any OpenAI-compatible server (vLLM, SGLang, llama.cpp, ...).

Two endpoints:

- ``completions`` (default): ``/v1/completions`` on the prompt flipsearch rendered with the
  model's own chat template, so the conditioning is byte-identical to the ``hf`` backend's.
- ``chat``: ``/v1/chat/completions`` with the messages; the server applies its template (for
  servers without a raw completions endpoint).

Requests run concurrently (at most ``max_in_flight`` at a time), round-robin over the base URLs,
with retries and exponential backoff on 408/429/5xx, timeouts and refused connections; other
4xx answers stop the run with the server's message. Results are yielded chunk by chunk, and
the requests that completed before a failure are yielded before the error is raised, so the
generation cache keeps every answer the server gave. The API key is read from the environment
variable the backend names and is sent only as a header.

Teacher scoring uses ``/v1/completions`` with ``echo`` and ``logprobs`` on token-id prompts
(what vLLM's server supports); chat-only servers cannot score, and say so.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from collections.abc import Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import httpx
import tenacity

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

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
ENDPOINTS = ("completions", "chat")
T = TypeVar("T")
# Tests route requests to an in-process fake server (httpx.MockTransport) and skip the waits.
default_transport: httpx.AsyncBaseTransport | None = None
sleep = asyncio.sleep


@dataclass(frozen=True)
class Options:
    """The openai backend's own settings. The API key is read from the environment variable
    named here when requests are made; it is never stored."""

    base_url: tuple[str, ...] = field(
        default=(),
        metadata=option(
            "An OpenAI-compatible server, e.g. http://HOST:8000/v1; repeat for round-robin."
        ),
    )
    served_model: str | None = field(
        default=None,
        metadata=option(
            "The server's name for the model (default: --model). --model still names the "
            "local tokenizer and chat template."
        ),
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata=option("Environment variable holding the API key (read, never stored)."),
    )
    openai_endpoint: str = field(
        default="completions",
        metadata=option(
            "completions (flipsearch renders the chat template) or chat (the server does)."
        ),
    )
    max_in_flight: int = field(default=32, metadata=option("Requests in flight at once.", min=1))
    request_timeout: float = field(default=300.0, metadata=option("Seconds per request.", min=1))
    request_retries: int = field(
        default=4, metadata=option("Retries on 429/5xx/timeouts, with backoff.", min=0)
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_url", tuple(self.base_url))
        if self.openai_endpoint not in ENDPOINTS:
            raise FlipsearchError(
                f"unknown openai endpoint {self.openai_endpoint!r}; choose completions or chat"
            )
        if not self.base_url:
            raise FlipsearchError(
                "the openai backend needs a server: --base-url http://HOST:PORT/v1 (repeatable)"
            )
        if self.max_in_flight < 1 or self.request_retries < 0 or self.request_timeout <= 0:
            raise FlipsearchError(
                "max_in_flight must be >= 1, retries >= 0 and request_timeout > 0"
            )


def create(loaded: LoadedModel, options: Options, batch_size: int) -> tuple[Any, Any]:
    generator = OpenAIGenerator(options, loaded, chunk=max(batch_size, 64))
    generator.check()
    return generator, generator


class _Retry(Exception):
    """A failure worth another attempt (a refused or reset connection, 408/429/5xx)."""

    def __init__(self, reason: str, wait: float = 0.0) -> None:
        super().__init__(reason)
        self.reason, self.wait = reason, wait


class OpenAIGenerator:
    """Generation and teacher scoring over HTTP."""

    def __init__(
        self,
        options: Options | Any,
        loaded: LoadedModel,
        chunk: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        # A BackendSpec("openai", ...) carries these options; the options themselves work too.
        spec: Options = getattr(options, "options", options)
        self.spec = spec
        self.base_urls = [url.rstrip("/") for url in spec.base_url]
        self.model = spec.served_model or loaded.name
        self.tokenizer = loaded.tokenizer
        self.stop_ids = stop_token_ids(loaded.tokenizer, loaded.generation_config)
        self.chunk = chunk
        self.transport = transport or default_transport
        # The served model, the local tokenizer and the endpoint decide the outputs; not the
        # local dtype/device suffix, nor which URL of the fleet answered.
        local = loaded.fingerprint
        if loaded.dtype and f"-{loaded.dtype}-" in local:  # load_model's "-dtype-device" suffix
            local = local[: local.rindex(f"-{loaded.dtype}-")]
        self.fingerprint = f"openai:{self.model}:{local}:{spec.openai_endpoint}"
        self.vllm = False  # set by check(): vLLM's server returns token ids on request
        # The server batches as it likes: flipsearch cannot make its answers batch-invariant.
        self.mode = "server-side batching (batch invariance is the server's setting)"
        self._next_url = itertools.cycle(self.base_urls)
        self.requests = 0  # HTTP requests sent, retries included (for benchmarks and tests)

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.spec.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=self.spec.request_timeout, headers=self._headers(), transport=self.transport
        )

    def check(self) -> None:
        """Every server answers ``/models`` and serves the model; a clear error otherwise."""
        _run(self._check())

    async def _check(self) -> None:
        async with self._client() as client:
            for url in self.base_urls:
                try:
                    response = await client.get(f"{url}/models", timeout=30)
                except httpx.TransportError as exc:
                    raise FlipsearchError(
                        f"cannot reach the server at {url} ({type(exc).__name__}: {exc}); "
                        "is it running, and is the URL the one ending in /v1?"
                    ) from exc
                if response.status_code in (401, 403):
                    raise FlipsearchError(
                        f"{url} refused the API key (HTTP {response.status_code}); set "
                        f"{self.spec.api_key_env}"
                    )
                if response.status_code != 200:
                    raise FlipsearchError(
                        f"{url}/models answered HTTP {response.status_code}: {response.text[:200]}"
                    )
                try:
                    served = {m["id"]: m for m in response.json()["data"]}
                except (ValueError, KeyError, TypeError) as exc:
                    raise FlipsearchError(
                        f"{url}/models is not an OpenAI-compatible model list"
                    ) from exc
                if self.model not in served:
                    raise FlipsearchError(
                        f"{url} does not serve model {self.model!r}; it serves "
                        f"{', '.join(sorted(served)) or 'nothing'} (set --served-model)"
                    )
                self.vllm = served[self.model].get("owned_by") == "vllm"

    # -- generation ------------------------------------------------------------------------

    def generate_batches(
        self, prompts: Sequence[str], decoding: Decoding
    ) -> Iterator[tuple[list[int], list[list[Generation]]]]:
        for start in range(0, len(prompts), self.chunk):
            indices = list(range(start, min(start + self.chunk, len(prompts))))
            bodies = [self._body(prompts[i], decoding) for i in indices]
            endpoint = "chat/completions" if self.spec.openai_endpoint == "chat" else "completions"
            answers = _run(self._post_all(endpoint, bodies))
            done = [(i, a) for i, a in zip(indices, answers, strict=True) if isinstance(a, dict)]
            if done:
                yield (
                    [i for i, _ in done],
                    [self._parse(answer, decoding.samples) for _, answer in done],
                )
            failure = next((a for a in answers if isinstance(a, BaseException)), None)
            if failure is not None:
                raise failure

    def generate_ids(
        self,
        rows: Sequence[Sequence[int]],
        decoding: Decoding,
        seeds: Sequence[int],
        max_tokens: Sequence[int],
    ) -> list[Generation]:
        """One continuation of each token-id prompt on ``/v1/completions`` (budget forcing):
        the server continues exactly the tokens it is sent."""
        if self.spec.openai_endpoint == "chat":
            raise FlipsearchError(
                "--max-thinking-tokens needs --openai-endpoint completions: the chat endpoint "
                "cannot continue a response it did not start"
            )
        results: list[Generation] = []
        for start in range(0, len(rows), self.chunk):
            part = range(start, min(start + self.chunk, len(rows)))
            bodies = []
            for i in part:
                body = self._body(list(rows[i]), replace(decoding, samples=1))
                body["max_tokens"] = int(max_tokens[i])
                if not decoding.greedy:
                    body["seed"] = int(seeds[i])
                bodies.append(body)
            answers = _run(self._post_all("completions", bodies))
            for answer in answers:
                if isinstance(answer, BaseException):
                    raise answer
                results.append(self._parse(answer, 1)[0])
        return results

    def _body(self, prompt: Any, decoding: Decoding) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": decoding.max_new_tokens,
            "temperature": decoding.temperature,
            "n": decoding.samples,
        }
        if not decoding.greedy:
            body.update(top_p=decoding.top_p, seed=request_seed(decoding.seed, prompt))
        if self.spec.openai_endpoint == "chat":
            messages = getattr(prompt, "messages", None)  # a contexts.Rendered knows its chat
            if messages is None:
                raise FlipsearchError("the chat endpoint needs prompts rendered by flipsearch")
            body["messages"] = [dict(m) for m in messages]
            if self.vllm:
                body.update(logprobs=True, top_logprobs=0, return_tokens_as_token_ids=True)
        else:
            body["prompt"] = prompt
            if self.vllm:
                body.update(logprobs=0, return_tokens_as_token_ids=True)
        if self.vllm:  # vLLM extensions: flipsearch cuts and decodes the tokens itself
            body.update(skip_special_tokens=False, add_special_tokens=False)
        return body

    def _parse(self, payload: dict[str, Any], samples: int) -> list[Generation]:
        choices = sorted(payload.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != samples:
            raise FlipsearchError(f"the server returned {len(choices)} choices for n={samples}")
        return [self._generation(choice) for choice in choices]

    def _generation(self, choice: dict[str, Any]) -> Generation:
        ids = _token_ids(choice.get("logprobs"))
        if ids is None:  # a server without token ids: tokenize its text locally
            text = choice.get("text")
            if text is None:
                text = (choice.get("message") or {}).get("content") or ""
            ids = self.tokenizer(str(text), add_special_tokens=False)["input_ids"]
        generation = finish(self.tokenizer, ids, self.stop_ids)
        if choice.get("finish_reason") == "stop" and generation.finish_reason != "stop":
            return Generation(generation.text, generation.token_ids, "stop")
        return generation

    # -- teacher scoring -------------------------------------------------------------------

    def token_logprobs(self, requests: Sequence[tuple[str, Sequence[int]]]) -> list[list[float]]:
        bodies, lengths = [], []
        for prompt, continuation in requests:
            ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            lengths.append((len(ids), len(continuation)))
            bodies.append(
                {
                    "model": self.model,
                    "prompt": ids + list(continuation),
                    "max_tokens": 1,
                    "temperature": 0.0,
                    "echo": True,
                    "logprobs": 0,
                }
            )
        answers = _run(self._post_all("completions", bodies))
        results = []
        for answer, (start, length) in zip(answers, lengths, strict=True):
            if isinstance(answer, BaseException):
                raise answer
            try:
                values = answer["choices"][0]["logprobs"]["token_logprobs"]
                results.append([float(v) for v in values[start : start + length]])
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise FlipsearchError(
                    "the server does not return prompt log-probabilities (echo + logprobs on "
                    "/v1/completions), so it cannot score continuations"
                ) from exc
            if len(results[-1]) != length:
                raise FlipsearchError("the server scored fewer tokens than it was sent")
        return results

    # -- HTTP ------------------------------------------------------------------------------

    async def _post_all(
        self, endpoint: str, bodies: Sequence[dict[str, Any]]
    ) -> list[dict[str, Any] | BaseException]:
        limit = asyncio.Semaphore(self.spec.max_in_flight)
        async with self._client() as client:
            return list(
                await asyncio.gather(
                    *(self._post(client, limit, endpoint, body) for body in bodies),
                    return_exceptions=True,
                )
            )

    async def _post(
        self,
        client: httpx.AsyncClient,
        limit: asyncio.Semaphore,
        endpoint: str,
        body: dict[str, Any],
    ) -> dict[str, Any]:
        failures: list[str] = []
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(_Retry),
            stop=tenacity.stop_after_attempt(self.spec.request_retries + 1),
            wait=_backoff,
            sleep=lambda seconds: sleep(seconds),  # looked up per call: tests skip the waits
            reraise=True,
        )
        async with limit:
            try:
                async for attempt in retrying:
                    with attempt:
                        return await self._attempt(client, endpoint, body, failures)
            except _Retry:
                pass
        raise FlipsearchError(
            f"no answer after {self.spec.request_retries + 1} attempts "
            f"({'; '.join(failures[-3:])}); answers already received are kept in the "
            "generation cache"
        )

    async def _attempt(
        self, client: httpx.AsyncClient, endpoint: str, body: dict[str, Any], failures: list[str]
    ) -> dict[str, Any]:
        """One request to the next server; ``_Retry`` for a failure worth another attempt."""
        url = next(self._next_url)
        self.requests += 1
        try:
            response = await client.post(f"{url}/{endpoint}", json=body)
        except httpx.TransportError as exc:  # refused, reset, timed out
            failures.append(f"{url}: {type(exc).__name__}")
            raise _Retry(failures[-1]) from exc
        if response.status_code in RETRY_STATUS:
            failures.append(f"{url}: HTTP {response.status_code}")
            raise _Retry(failures[-1], _retry_after(response))
        if response.status_code != 200:  # our request is wrong: retrying will not help
            raise FlipsearchError(
                f"{url}/{endpoint} refused the request (HTTP "
                f"{response.status_code}): {response.text[:300]}"
            )
        try:
            payload: dict[str, Any] = response.json()
        except ValueError as exc:
            failures.append(f"{url}: an answer that is not JSON")
            raise _Retry(failures[-1]) from exc
        return payload


def _backoff(state: tenacity.RetryCallState) -> float:
    """Jittered exponential backoff (0.5 s doubling, at most 30 s), or the server's
    ``Retry-After`` when it asks for longer."""
    attempt = state.attempt_number - 1
    wait = min(30.0, 0.5 * 2**attempt) * (0.75 + 0.5 * random.random())
    failure = state.outcome.exception() if state.outcome is not None else None
    return max(wait, failure.wait) if isinstance(failure, _Retry) else wait


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run to completion, also when called from inside an event loop (Jupyter, inspect_ai)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(60.0, float(response.headers.get("retry-after", 0)))
    except ValueError:
        return 0.0


def _token_ids(logprobs: Any) -> list[int] | None:
    """Token ids from vLLM's ``token_id:N`` tokens (completions or chat), else None."""
    if not logprobs:
        return None
    tokens = logprobs.get("tokens")
    if tokens is None and isinstance(logprobs.get("content"), list):  # chat format
        tokens = [entry.get("token") for entry in logprobs["content"]]
    if not tokens or not all(str(t).startswith("token_id:") for t in tokens):
        return None
    return [int(str(t).removeprefix("token_id:")) for t in tokens]
