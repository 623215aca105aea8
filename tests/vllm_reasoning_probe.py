"""Budget forcing on the vllm backend against hf's; run in the vLLM environment by
tests/test_vllm_backend.py.

    .venv-vllm/bin/python tests/vllm_reasoning_probe.py MODEL WORKDIR

The embedded model is given a chat template that opens a reasoning block (it never closes one
itself), so every response is forced closed after the budget. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BUDGET, ANSWER = 12, 8


def main(model: str, workdir: str) -> dict[str, object]:
    from flipsearch import Decoding, load_model, load_prompts
    from flipsearch.backends.hf import HFGenerator
    from flipsearch.backends.vllm import VLLMGenerator
    from flipsearch.contexts import Renderer
    from flipsearch.reasoning import BudgetForcedGenerator, ReasoningSettings, detect_format
    from tests.helpers import reasoning_copy

    copy = str(reasoning_copy(model, Path(workdir) / "reasoning-model"))
    light = load_model(copy, dtype="fp32", weights=False)
    heavy = load_model(copy, dtype="fp32")
    fmt = detect_format(light.tokenizer, ReasoningSettings(max_thinking_tokens=BUDGET))
    prompts = Renderer(light.tokenizer, 64).render_all(
        [p.text for p in load_prompts("builtin:harmful")[:6]]
    )
    greedy = Decoding(max_new_tokens=ANSWER)
    vllm = BudgetForcedGenerator(VLLMGenerator(light), light.tokenizer, fmt, BUDGET)
    hf = BudgetForcedGenerator(HFGenerator(heavy), heavy.tokenizer, fmt, BUDGET)
    ours, theirs = _first(vllm, prompts, greedy), _first(hf, prompts, greedy)
    close = len(vllm.close_ids)
    shapes = []
    for generation in ours:
        thought = fmt.reasoning_tokens(light.tokenizer, generation.token_ids)
        split = fmt.split(generation.text)
        shapes.append(
            {
                "closed": split.closed,
                "answer_came": not split.unfinished,
                "reasoning_tokens": thought,
                "answer_tokens": len(generation.token_ids) - BUDGET - close,
            }
        )
    sampled = Decoding(max_new_tokens=ANSWER, temperature=1.0, samples=2, seed=3)
    first, again = _all(vllm, prompts[:3], sampled), _all(vllm, prompts[:3], sampled)
    return {
        "opened_by_template": fmt.opened_by_template,
        "budget": BUDGET,
        "answer_budget": ANSWER,
        "close_tokens": close,
        "shapes": shapes,
        "identical_to_hf": sum(
            a.token_ids == b.token_ids for a, b in zip(ours, theirs, strict=True)
        ),
        "first_phase_identical_to_hf": sum(
            a.token_ids[:BUDGET] == b.token_ids[:BUDGET] for a, b in zip(ours, theirs, strict=True)
        ),
        "prompts": len(prompts),
        "sampled_repeat_identical": first == again,
        "samples_per_prompt": [len(s) for s in first],
        "fingerprint": vllm.fingerprint,
    }


def _first(generator, prompts, decoding):  # type: ignore[no-untyped-def]
    return [samples[0] for samples in _all(generator, prompts, decoding)]


def _all(generator, prompts, decoding):  # type: ignore[no-untyped-def]
    found: dict[int, object] = {}
    for indices, batch in generator.generate_batches(prompts, decoding):
        kept = [[g.token_ids for g in s] if decoding.samples > 1 else s for s in batch]
        found.update(zip(indices, kept, strict=True))
    return [found[i] for i in range(len(prompts))]


if __name__ == "__main__":  # vLLM's engine spawns processes: scripts need this guard
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
