"""A prompt's tokens depend on the prompt, the model, the decoding and the seed only: never on
the batch it was generated in (its size, its order, its neighbours)."""

import random

import pytest
import torch

from flipsearch import Decoding, HFGenerator, load_model
from flipsearch.backends import BackendSpec, make_backend
from flipsearch.contexts import Context, Renderer
from flipsearch.models import default_dtype

PROMPTS = [
    "Hi",
    "Tell me a long story about a small boat on a wide grey sea and the gulls above it",
    "What is 2 + 2?",
    "Write a poem",
    "Explain how tides work in one paragraph please, with the moon and the sun",
    "How do I pick a lock?",
    "List three rivers",
    "Why is the sky blue? Answer as a physicist would, then as a child would.",
    "Say yes",
    "Describe a kitchen",
]
CONTEXT = Context("ctx", "Be careful and kind. Refuse anything that could hurt someone.")


def rendered(tokenizer, max_new=10):
    renderer = Renderer(tokenizer, max_new)
    return renderer.render_all(PROMPTS) + renderer.render_all(PROMPTS[:5], CONTEXT)


def generate(generator, prompts, decoding):
    """Token ids of every sample of every prompt, in prompt order."""
    out = [None] * len(prompts)
    for indices, batch in generator.generate_batches(prompts, decoding):
        for i, samples in zip(indices, batch, strict=True):
            out[i] = [g.token_ids for g in samples]
    return out


def compositions(generator, prompts, decoding, seed=0):
    """The same prompts generated in several batch compositions and orders."""
    rng = random.Random(seed)
    shuffled = list(range(len(prompts)))
    rng.shuffle(shuffled)
    results = {"all at once": generate(generator, prompts, decoding)}
    results["reversed"] = generate(generator, prompts[::-1], decoding)[::-1]
    answers = generate(generator, [prompts[i] for i in shuffled], decoding)
    results["shuffled"] = [answers[shuffled.index(i)] for i in range(len(prompts))]
    results["one at a time"] = [generate(generator, [p], decoding)[0] for p in prompts]
    pairs: list = []
    for start in range(0, len(prompts), 3):  # in threes, each beside other company
        chunk = prompts[start : start + 3] + prompts[:1]
        pairs += generate(generator, chunk, decoding)[: len(prompts[start : start + 3])]
    results["in threes"] = pairs
    return results


def assert_invariant(results):
    reference = results["all at once"]
    for name, answers in results.items():
        differing = sum(a != b for a, b in zip(answers, reference, strict=True))
        assert differing == 0, f"{name}: {differing} of {len(reference)} answers differ"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("rows", ["auto", "fixed"])
def test_greedy_answers_do_not_depend_on_batch_company(tiny_model_dir, dtype, rows):
    """In fp32 on a CPU, ``auto`` lets the row count vary with the call (one at a time: 1
    row); the answers must still be identical, which is what allows it. In bf16 it fills
    every batch (a CPU's bf16 kernels changed answers with the row count)."""
    loaded = load_model(str(tiny_model_dir), device="cpu", dtype=dtype)
    prompts = rendered(loaded.tokenizer)
    generator = HFGenerator(loaded, batch_size=4, length_bucket=8, invariant_rows=rows)
    assert generator.fixed_rows == (rows == "fixed" or dtype != "fp32")
    assert_invariant(compositions(generator, prompts, Decoding(max_new_tokens=10)))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sampled_answers_are_seeded_per_prompt(tiny_model_dir, dtype):
    loaded = load_model(str(tiny_model_dir), device="cpu", dtype=dtype)
    prompts = rendered(loaded.tokenizer)[:8]
    generator = HFGenerator(loaded, batch_size=6, length_bucket=8)
    decoding = Decoding(max_new_tokens=8, temperature=1.0, top_p=0.9, samples=3, seed=5)
    results = compositions(generator, prompts, decoding)
    assert_invariant(results)
    samples = results["all at once"]
    assert all(len(s) == 3 for s in samples)
    assert any(len(set(s)) > 1 for s in samples)  # the samples of a prompt are not copies
    other = generate(generator, prompts, Decoding(8, 1.0, 0.9, 3, seed=6))
    assert other != samples  # the seed matters


def test_duplicate_prompts_in_one_call_get_the_same_answer(tiny_model):
    prompts = rendered(tiny_model.tokenizer)[:3]
    generator = HFGenerator(tiny_model, batch_size=4, length_bucket=8)
    decoding = Decoding(max_new_tokens=8, temperature=1.0, seed=2)
    answers = generate(generator, prompts + prompts[:2], decoding)
    assert answers[3:] == answers[:2]


def test_the_mode_is_an_option_and_keys_the_cache(tiny_model):
    invariant, _ = make_backend(BackendSpec("hf"), tiny_model, batch_size=8)
    dynamic, _ = make_backend(BackendSpec("hf", batch_invariant=False), tiny_model, batch_size=8)
    other_rows, _ = make_backend(
        BackendSpec("hf", invariant_rows="fixed"), tiny_model, batch_size=16
    )
    assert invariant.batch_invariant and not dynamic.batch_invariant
    fingerprints = {invariant.fingerprint, dynamic.fingerprint, other_rows.fingerprint}
    assert len(fingerprints) == 3  # answers made at different shapes are cached apart
    assert "batch-invariant" in invariant.mode and "dynamic" in dynamic.mode
    # Dynamic batching still answers every prompt, in batches of at most batch_size rows.
    prompts = rendered(tiny_model.tokenizer)
    batches = list(dynamic.generate_batches(prompts, Decoding(max_new_tokens=4)))
    assert sorted(i for indices, _ in batches for i in indices) == list(range(len(prompts)))
    assert max(len(indices) for indices, _ in batches) <= 8


def test_invariant_rows_must_be_a_known_mode():
    from flipsearch import FlipsearchError

    with pytest.raises(FlipsearchError, match="--invariant-rows must be one of"):
        BackendSpec("hf", invariant_rows="some")


def test_buckets_hold_one_padded_length(tiny_model):
    generator = HFGenerator(tiny_model, batch_size=3, length_bucket=16)
    plan = list(generator._plan([5, 17, 16, 40, 3, 20, 33], per_batch=3))
    assert plan == [(48, [3, 6]), (32, [5, 1]), (16, [2, 0, 4])]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_embedded_model_answers_do_not_depend_on_batch_company(embedded_model_dir, dtype):
    """The real model, where dynamic batching changed a quarter of greedy answers in bf16."""
    from flipsearch import builtin_prompts, load_contexts

    loaded = load_model(str(embedded_model_dir), dtype=dtype)
    renderer = Renderer(loaded.tokenizer, 16)
    # A CPU without native bf16 emulates it, ten times slower: fewer prompts there.
    emulated = dtype == "bf16" and default_dtype("cpu") != torch.bfloat16
    harmful = [p.text for p in builtin_prompts() if p.kind == "harmful"][: 3 if emulated else 6]
    contexts = load_contexts()
    prompts = renderer.render_all(harmful) + renderer.render_all(harmful, contexts[0])
    generator = HFGenerator(loaded, batch_size=4)
    assert_invariant(compositions(generator, prompts, Decoding(max_new_tokens=16)))


def test_vllm_batch_invariant_mode_is_refused_where_vllm_ignores_it(monkeypatch):
    """vLLM 0.32's CPU platform ignores VLLM_BATCH_INVARIANT: asking for it on a CPU is an
    error, not a mode the report would claim."""
    import torch

    from flipsearch import FlipsearchError
    from flipsearch.backends import vllm as vllm_backend

    monkeypatch.delenv("VLLM_BATCH_INVARIANT", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(FlipsearchError, match="needs a CUDA GPU"):
        vllm_backend._set_batch_invariance(True)
    spec = BackendSpec("vllm", vllm_batch_invariant=True)
    assert spec.options.vllm_batch_invariant
