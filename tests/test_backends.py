import pytest

from flipsearch import Decoding, FlipsearchError, GenerationCache, HFGenerator
from flipsearch.backends.cache import generate_cached
from flipsearch.contexts import Renderer

PROMPTS = [
    "Hi",
    "Tell me a long story about a small boat on a wide grey sea",
    "What is 2 + 2?",
    "Write a poem",
    "Explain how tides work in one paragraph please",
]


def _rendered(tiny_model):
    return Renderer(tiny_model.tokenizer, 12).render_all(PROMPTS)


def _generate(generator, prompts, decoding):
    out = [None] * len(prompts)
    for indices, batch in generator.generate_batches(prompts, decoding):
        for i, samples in zip(indices, batch, strict=True):
            out[i] = samples
    return out


def test_batched_greedy_equals_one_at_a_time(tiny_model):
    """Left padding and length sorting must not change what greedy decoding produces."""
    rendered = _rendered(tiny_model)
    decoding = Decoding(max_new_tokens=12)
    batched = _generate(HFGenerator(tiny_model, batch_size=8), rendered, decoding)
    single = _generate(HFGenerator(tiny_model, batch_size=1), rendered, decoding)
    assert [s[0].token_ids for s in batched] == [s[0].token_ids for s in single]
    assert all(len(s[0].token_ids) <= 12 for s in batched)


def test_sampling_gives_n_samples_and_is_seeded(tiny_model):
    rendered = _rendered(tiny_model)[:3]
    decoding = Decoding(max_new_tokens=8, temperature=1.0, samples=3, seed=7)
    first = _generate(HFGenerator(tiny_model, batch_size=6), rendered, decoding)
    again = _generate(HFGenerator(tiny_model, batch_size=6), rendered, decoding)
    assert all(len(samples) == 3 for samples in first)
    assert [[g.token_ids for g in s] for s in first] == [[g.token_ids for g in s] for s in again]
    other = _generate(
        HFGenerator(tiny_model, batch_size=6), rendered, Decoding(8, 1.0, 1.0, 3, seed=8)
    )
    assert [[g.token_ids for g in s] for s in first] != [[g.token_ids for g in s] for s in other]


def test_decoding_validation():
    with pytest.raises(FlipsearchError, match="temperature above 0"):
        Decoding(samples=2)
    with pytest.raises(FlipsearchError):
        Decoding(max_new_tokens=0)
    assert Decoding(temperature=0.0, seed=1).key() == Decoding(temperature=0.0, seed=2).key()


def test_cache_generates_nothing_twice(tiny_model, tmp_path):
    rendered = _rendered(tiny_model)
    generator = HFGenerator(tiny_model, batch_size=2)
    cache = GenerationCache(tmp_path / "g.sqlite")
    decoding = Decoding(max_new_tokens=6)
    first, generated = generate_cached(generator, cache, rendered + rendered[:1], decoding)
    assert generated == len(rendered)  # the duplicate prompt is generated once
    reopened = GenerationCache(tmp_path / "g.sqlite")
    second, generated_again = generate_cached(generator, reopened, rendered, decoding)
    assert generated_again == 0
    assert [s[0] for s in second] == [s[0] for s in first[: len(rendered)]]
    _, other = generate_cached(generator, reopened, rendered, Decoding(max_new_tokens=7))
    assert other == len(rendered)  # decoding settings are part of the key
    assert len(reopened) == 2 * len(rendered)


def test_a_new_cache_file_always_has_its_table(tmp_path):
    """Another process opening the cache while it is being created sees the table, never an
    empty SQLite file (it is created aside and linked into place)."""
    import sqlite3

    path = tmp_path / "run" / "generations.sqlite"
    first = GenerationCache(path)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM generations").fetchone() == (0,)
    second = GenerationCache(path)  # the file exists: opened, not replaced
    assert len(second) == 0 and not list(path.parent.glob(".*.new"))
    first.close()
    second.close()


def test_one_long_prompt_gets_a_batch_of_its_own(tiny_model):
    """Length-aware batching: a long prompt is not padded into everyone's batch, in either
    mode (and the invariant mode keeps one length bucket per batch)."""
    from flipsearch.backends.hf import HFGenerator

    lengths = [40, 5000, 52, 47, 300, 45]
    for invariant in (False, True):
        generator = HFGenerator(tiny_model, batch_size=64, batch_invariant=invariant)
        batches = [sorted(indices) for _, indices in generator._plan(lengths, 64)]
        assert [1] in batches and [4] in batches
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    dynamic = HFGenerator(tiny_model, batch_size=64, batch_invariant=False)
    assert [sorted(b) for _, b in dynamic._plan([60, 52, 40, 47], 64)] == [[0, 1, 2, 3]]
