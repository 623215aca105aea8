"""Compares the vllm backend with hf; run in the vLLM environment by tests/test_vllm_backend.py.

    .venv-vllm/bin/python tests/vllm_probe.py MODEL DTYPE PROMPTS

Prints one JSON object. Where a greedy vLLM answer departs from hf's, it records the position
and hf's log-probability gap there between its own token and vLLM's: a near tie that the two
engines' different kernels (and batch shapes) break differently.
"""

from __future__ import annotations

import json
import sys


def main(model: str, dtype: str, count: int) -> dict[str, object]:
    import torch

    from flipsearch import Decoding, flip_rate, load_contexts, load_model, load_prompts
    from flipsearch.backends.hf import HFGenerator, HFScorer
    from flipsearch.backends.vllm import VLLMGenerator
    from flipsearch.contexts import Renderer
    from flipsearch.scoring import response_logits

    hf_model = load_model(model, dtype=dtype)
    light = load_model(model, dtype=dtype, weights=False)
    renderer = Renderer(hf_model.tokenizer, 24)
    texts = [p.text for p in load_prompts("builtin:harmful")[:count]]
    context = next(c for c in load_contexts() if c.placement == "system")
    students = renderer.render_all(texts)
    teachers = renderer.render_all(texts, context)
    greedy = Decoding(max_new_tokens=24)

    vllm = VLLMGenerator(light)
    ours = _generate(vllm, students, greedy)
    theirs = _generate(HFGenerator(hf_model, batch_size=count), students, greedy)
    departures = []
    for prompt, mine, reference in zip(students, ours, theirs, strict=True):
        a, b = mine.token_ids, reference.token_ids
        if a == b:
            continue
        k = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        ids = hf_model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        logprobs = torch.log_softmax(response_logits(hf_model, ids, list(b[: k + 1])), -1)[k]
        vllm_token = a[k] if k < len(a) else None  # None: vLLM stopped where hf went on
        gap = None if vllm_token is None else float(logprobs[b[k]] - logprobs[vllm_token])
        departures.append({"position": k, "hf_gap": gap})

    requests = [(t, r.token_ids) for t, r in zip(teachers, theirs, strict=True) if r.token_ids]
    scored_vllm = vllm.token_logprobs(requests)
    scored_hf = HFScorer(hf_model).token_logprobs(requests)
    score_diff = max(
        abs(x - y)
        for row_v, row_h in zip(scored_vllm, scored_hf, strict=True)
        for x, y in zip(row_v, row_h, strict=True)
    )

    def sample(seed: int) -> list[list[tuple[int, ...]]]:
        decoding = Decoding(max_new_tokens=12, temperature=1.0, samples=3, seed=seed)
        return [[g.token_ids for g in s] for s in _generate(vllm, students[:4], decoding, all)]

    first, again, other = sample(1), sample(1), sample(2)
    # The library entry point on the same engine (same model and dtype: reused, not rebuilt).
    scored = flip_rate(
        light,
        [context],
        load_prompts("builtin:harmful")[:4],
        decoding=Decoding(max_new_tokens=16),
        backend="vllm",
    )
    from flipsearch.errors import FlipsearchError

    try:
        VLLMGenerator(light, {"dtype": "float16"})
        dtype_override_refused = False
    except FlipsearchError:
        dtype_override_refused = True
    return {
        "dtype_override_refused": dtype_override_refused,
        "flip_rate_rows": len(scored.to_pandas()),
        "prompts": count,
        "identical": sum(a.token_ids == b.token_ids for a, b in zip(ours, theirs, strict=True)),
        "departures": departures,
        "scored_tokens": sum(len(r) for _, r in requests),
        "max_logprob_diff": score_diff,
        "samples_per_prompt": [len(s) for s in first],
        "seeded_repeat_identical": first == again,
        "other_seed_differs": first != other,
        "engine_reused": VLLMGenerator(light).llm is vllm.llm,
        "fingerprint": vllm.fingerprint,
        "hf_fingerprint": hf_model.fingerprint,
        "texts_from_ids": all(
            g.text == hf_model.tokenizer.decode(list(g.token_ids), skip_special_tokens=True).strip()
            for g in ours
        ),
    }


def _generate(generator, prompts, decoding, every=None):  # type: ignore[no-untyped-def]
    """Responses in prompt order: the first sample of each, or all of them with ``every``."""
    results: dict[int, object] = {}
    for indices, batch in generator.generate_batches(prompts, decoding):
        for index, samples in zip(indices, batch, strict=True):
            results[index] = samples if every else samples[0]
    return [results[i] for i in range(len(prompts))]


if __name__ == "__main__":  # vLLM's engine spawns processes: scripts need this guard
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
