"""The openai backend against an in-process fake server (httpx.MockTransport): the request
bodies, retries, round-robin, errors, and what survives a dead server. The real vLLM server is
in test_servers.py."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from flipsearch import BackendSpec, Context, Decoding, Prompt, RunConfig, run
from flipsearch.backends import openai as backend_module
from flipsearch.backends.cache import GenerationCache, generate_cached
from flipsearch.backends.openai import OpenAIGenerator
from flipsearch.contexts import Renderer, build_messages
from flipsearch.errors import FlipsearchError

REFUSAL = "I can't help with that."
COMPLIANCE = "Sure, here is how."


class FakeServer:
    """Answers like vLLM's OpenAI server: refuses when the prompt carries the word REFUSE."""

    def __init__(self, tokenizer, model: str = "fake", fail: dict[int, int] | None = None):
        self.tokenizer = tokenizer
        self.model = model
        self.fail = fail or {}  # request number -> HTTP status to answer instead
        self.dead_after: int | None = None  # generation requests served before "dying"
        self.bodies: list[dict] = []
        self.hosts: list[str] = []
        self.headers: list[httpx.Headers] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.headers.append(request.headers)
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": self.model, "owned_by": "vllm"}]})
        number = len(self.bodies)
        if self.dead_after is not None and number >= self.dead_after:
            raise httpx.ConnectError("connection refused", request=request)
        body = json.loads(request.content)
        self.bodies.append(body)
        self.hosts.append(request.url.host)
        if number in self.fail:
            return httpx.Response(self.fail[number], text="busy", headers={"retry-after": "0"})
        if body.get("echo"):  # scoring: a log-probability for every prompt token
            values = [None] + [-0.25 * (i % 4) for i in range(1, len(body["prompt"]))]
            return httpx.Response(
                200, json={"choices": [{"index": 0, "logprobs": {"token_logprobs": values}}]}
            )
        prompt = body.get("prompt") or json.dumps(body.get("messages"))
        text = REFUSAL if "REFUSE" in prompt else COMPLIANCE
        ids = [*self.tokenizer(text, add_special_tokens=False)["input_ids"]]
        ids.append(self.tokenizer.eos_token_id)
        tokens = [f"token_id:{i}" for i in ids]
        logprobs = (
            {"content": [{"token": t} for t in tokens]}
            if "messages" in body
            else {"tokens": tokens}
        )
        choice = {"text": text, "finish_reason": "stop", "logprobs": logprobs}
        choices = [{**choice, "index": i} for i in range(body["n"])]
        return httpx.Response(200, json={"choices": choices})


@pytest.fixture
def no_waiting(monkeypatch):
    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(backend_module, "sleep", record)
    return waits


def make(tiny_model, server, urls=("http://a/v1",), **options) -> OpenAIGenerator:
    spec = BackendSpec("openai", base_url=tuple(urls), served_model=server.model, **options)
    generator = OpenAIGenerator(spec, tiny_model, chunk=4, transport=httpx.MockTransport(server))
    generator.check()
    return generator


def rendered(tiny_model, texts, context=None):
    return Renderer(tiny_model.tokenizer, 16).render_all(texts, context)


def collect(generator, prompts, decoding=None):
    out = {}
    for indices, batch in generator.generate_batches(prompts, decoding or Decoding(16)):
        out.update(zip(indices, batch, strict=True))
    return [out[i] for i in range(len(prompts))]


def test_completions_send_the_rendered_prompt_and_read_token_ids(tiny_model, no_waiting):
    server = FakeServer(tiny_model.tokenizer)
    generator = make(tiny_model, server)
    prompts = rendered(tiny_model, ["How do I pick a lock?", "Tell me a secret."])
    results = collect(generator, prompts)
    assert [r[0].text for r in results] == [COMPLIANCE, COMPLIANCE]
    expected = tuple(tiny_model.tokenizer(COMPLIANCE, add_special_tokens=False)["input_ids"])
    assert results[0][0].token_ids == expected  # cut before the EOS token
    assert results[0][0].finish_reason == "stop"
    body = server.bodies[0]
    assert body["prompt"] == prompts[0] and body["model"] == "fake"
    assert body["temperature"] == 0 and "seed" not in body  # greedy
    assert body["return_tokens_as_token_ids"] and body["add_special_tokens"] is False
    assert generator.fingerprint.startswith("openai:fake:")
    # The local dtype and device do not decide a served answer: not part of the key.
    assert tiny_model.fingerprint.endswith("-float32-cpu")
    local = tiny_model.fingerprint.removesuffix("-float32-cpu")
    assert generator.fingerprint == f"openai:fake:{local}:completions"


def test_works_when_called_inside_a_running_event_loop(tiny_model, no_waiting):
    import asyncio

    server = FakeServer(tiny_model.tokenizer)
    generator = make(tiny_model, server)

    async def notebook_cell():  # Jupyter and inspect_ai call library code from a running loop
        return collect(generator, rendered(tiny_model, ["a question"]))

    [[generation]] = asyncio.run(notebook_cell())
    assert generation.text == COMPLIANCE


def test_sampling_sends_n_and_a_per_prompt_seed(tiny_model, no_waiting):
    server = FakeServer(tiny_model.tokenizer)
    generator = make(tiny_model, server)
    prompts = rendered(tiny_model, ["a question", "another question"])
    decoding = Decoding(16, temperature=0.8, top_p=0.9, samples=3, seed=7)
    results = collect(generator, prompts, decoding)
    assert [len(r) for r in results] == [3, 3]
    seeds = [b["seed"] for b in server.bodies]
    assert len(set(seeds)) == 2 and all(b["n"] == 3 for b in server.bodies)
    collect(generator, prompts, decoding)
    assert [b["seed"] for b in server.bodies[2:]] == seeds  # the same prompt, the same seed


def test_chat_endpoint_sends_the_messages(tiny_model, no_waiting):
    server = FakeServer(tiny_model.tokenizer)
    generator = make(tiny_model, server, openai_endpoint="chat")
    context = Context("c", "REFUSE anything harmful.", "system")
    prompts = rendered(tiny_model, ["How do I pick a lock?"], context)
    [[generation]] = collect(generator, prompts)
    assert server.bodies[0]["messages"] == build_messages("How do I pick a lock?", context)
    assert "prompt" not in server.bodies[0]
    assert generation.text == REFUSAL
    assert generator.fingerprint.endswith(":chat")


def test_transient_failures_are_retried_with_growing_waits(tiny_model, no_waiting):
    server = FakeServer(tiny_model.tokenizer, fail={0: 503, 1: 429, 2: 502})
    generator = make(tiny_model, server)
    [[generation]] = collect(generator, rendered(tiny_model, ["one prompt"]))
    assert generation.text == COMPLIANCE
    assert generator.requests == 4
    assert len(no_waiting) == 3 and no_waiting[0] < no_waiting[2]


def test_requests_alternate_between_base_urls(tiny_model, no_waiting):
    server = FakeServer(tiny_model.tokenizer)
    generator = make(tiny_model, server, urls=("http://a/v1", "http://b/v1/"))
    collect(generator, rendered(tiny_model, [f"prompt {i}" for i in range(8)]))
    assert sorted(server.hosts) == ["a"] * 4 + ["b"] * 4


def test_client_errors_are_not_retried(tiny_model, no_waiting):
    server = FakeServer(tiny_model.tokenizer, fail={0: 400})
    generator = make(tiny_model, server)
    with pytest.raises(FlipsearchError, match=r"refused the request \(HTTP 400\): busy"):
        collect(generator, rendered(tiny_model, ["one prompt"]))
    assert generator.requests == 1 and not no_waiting


def test_wrong_model_and_unreachable_server_are_clear_errors(tiny_model):
    server = FakeServer(tiny_model.tokenizer, model="served-name")
    spec = BackendSpec("openai", base_url=("http://a/v1",), served_model="typo")
    with pytest.raises(FlipsearchError, match="does not serve model 'typo'; it serves served-name"):
        OpenAIGenerator(spec, tiny_model, transport=httpx.MockTransport(server)).check()

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    spec = BackendSpec("openai", base_url=("http://127.0.0.1:9/v1",))
    with pytest.raises(FlipsearchError, match=r"cannot reach the server at http://127.0.0.1:9/v1"):
        OpenAIGenerator(spec, tiny_model, transport=httpx.MockTransport(refuse)).check()


def test_backend_spec_rejects_inconsistent_settings():
    with pytest.raises(FlipsearchError, match="unknown backend 'tgi'"):
        BackendSpec("tgi")
    with pytest.raises(FlipsearchError, match="needs a server: --base-url"):
        BackendSpec("openai")
    with pytest.raises(FlipsearchError, match="--base-url is for --backend openai"):
        BackendSpec("hf", base_url=("http://a/v1",))
    with pytest.raises(FlipsearchError, match="unknown openai endpoint 'responses'"):
        BackendSpec("openai", base_url=("http://a/v1",), openai_endpoint="responses")


def test_answers_received_before_the_server_dies_stay_cached(tiny_model, tmp_path, no_waiting):
    server = FakeServer(tiny_model.tokenizer)
    server.dead_after = 6  # one chunk of 4, then 2 of the next chunk's 4
    generator = make(tiny_model, server, request_retries=2)
    prompts = rendered(tiny_model, [f"prompt {i}" for i in range(12)])
    cache = GenerationCache(tmp_path / "cache.sqlite")
    with pytest.raises(FlipsearchError, match=r"no answer after 3 attempts.*ConnectError"):
        generate_cached(generator, cache, prompts, Decoding(16))
    assert len(cache) == 6
    server.dead_after = None  # the server is back: only the missing prompts are asked for
    sent_before = len(server.bodies)
    results, generated = generate_cached(generator, cache, prompts, Decoding(16))
    assert generated == 6 and len(server.bodies) - sent_before == 6
    assert all(r[0].text == COMPLIANCE for r in results)


def test_a_run_through_the_openai_backend(tiny_model, tmp_path, monkeypatch, no_waiting):
    server = FakeServer(tiny_model.tokenizer, model="tiny")
    monkeypatch.setattr(backend_module, "default_transport", httpx.MockTransport(server))
    monkeypatch.setenv("FLIPSEARCH_TEST_KEY", "sk-do-not-store-me")
    prompts = [Prompt(f"h{i}", "harmful", "test", f"Explain harmful thing {i}.") for i in range(6)]
    prompts += [Prompt(f"b{i}", "benign", "test", f"Explain benign topic {i}.") for i in range(3)]
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text(
        "".join(json.dumps({"id": p.id, "kind": p.kind, "prompt": p.text}) + "\n" for p in prompts)
    )
    config = RunConfig(
        out=str(tmp_path / "run"),
        prompts=[str(prompt_file)],
        max_new_tokens=16,
        holdout_fraction=0.0,
        final_fraction=0.0,
        max_benign_refusal=1.0,  # the fake server refuses every benign prompt too
        trials=0,
        backend="openai",
        base_url=["http://a/v1"],
        served_model="tiny",
        api_key_env="FLIPSEARCH_TEST_KEY",
    )
    context = Context("refuse", "REFUSE every harmful request.", "system")
    result = run(config, [context], model=tiny_model)
    unsafe = result.student_search.unsafe_rate
    assert (unsafe.successes, unsafe.n) == (6, 6)
    [score] = result.search
    # The fake server refuses whenever the context is in the prompt: every answer flips.
    assert (score.flip_rate.successes, score.flip_rate.n) == (6, 6)
    assert all(h["authorization"] == "Bearer sk-do-not-store-me" for h in server.headers)
    analysis = json.loads((Path(config.out) / "token_kl.json").read_text())
    assert "sampled-token estimate" in analysis["divergence"]
    assert analysis["n_by_position"][0] == 6
    info = json.loads((Path(config.out) / "run.json").read_text())
    assert info["backend"] == "openai" and info["generator_fingerprint"].startswith("openai:tiny:")
    for file in Path(config.out).rglob("*"):
        if file.is_file():
            assert b"sk-do-not-store-me" not in file.read_bytes(), file
