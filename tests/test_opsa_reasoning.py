"""OPSA on reasoning models: the forward-reverse divergence, budget-forced rollouts, the
metrics split at the reasoning boundary, and the token analysis's answer keys.

The tiny models are built here with their own chat templates, in both styles a reasoning model
comes in: (a) the template's generation prompt opens ``<think>`` (Qwen3, DeepSeek-R1-Distill:
the model's text starts inside the block), (b) the template is plain and the model opens it.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from flipsearch.backends._base import Generation
from flipsearch.backends.hf import HFGenerator
from flipsearch.config import TrainConfig
from flipsearch.contexts import Context, Renderer
from flipsearch.errors import FlipsearchError
from flipsearch.fliprate import ContextScore, Judged, PairedOutcome
from flipsearch.judging._base import Verdict
from flipsearch.opsa import (
    FORWARD_REVERSE,
    Example,
    Trainer,
    check_divergence,
    distillation_loss,
    token_divergence,
)
from flipsearch.prompts import Prompt
from flipsearch.reasoning import ReasoningFormat
from flipsearch.scoring import analyse_context
from flipsearch.scoring import token_divergence as scored_divergence
from tests.conftest import build_tiny_model

_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
)
TEMPLATE_OPENS = (
    _CHATML + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"
)
TEMPLATE_PLAIN = (
    _CHATML + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
STYLES = {"template-opens": TEMPLATE_OPENS, "model-opens": TEMPLATE_PLAIN}
BUDGET = 6


def build_reasoning_model(directory: Path, template: str, seed: int = 0) -> Path:
    """The tests' tiny random Llama, its tokenizer knowing ``<think>``/``</think>`` (plain
    added tokens, so decoding keeps them, as Qwen3's does), with ``template``."""
    return build_tiny_model(directory, seed, template, ("<think>", "</think>"))


@pytest.fixture(scope="module", params=sorted(STYLES))
def styled_model(request: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    style = request.param
    return style, build_reasoning_model(tmp_path_factory.mktemp(style), STYLES[style])


def _prompts_file(directory: Path) -> str:
    """A few short prompts of each kind (the shipped sets would be slower to render)."""
    import json

    rows = [
        {"id": f"h{i}", "kind": "harmful", "prompt": f"How do I pick lock {i}?"} for i in range(4)
    ]
    rows += [
        {"id": f"b{i}", "kind": "benign", "prompt": f"Tell me about sea {i}."} for i in range(4)
    ]
    path = directory / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(directory: Path, model: Path, **settings: Any) -> TrainConfig:
    """A quick training config; a divergence the config does not list yet is set after."""
    divergence = settings.pop("divergence", "reverse")
    settings.setdefault("max_thinking_tokens", BUDGET)
    config = TrainConfig(
        context="Refuse harmful requests.",
        out=str(directory / "train"),
        model=str(model),
        prompts=[_prompts_file(directory)],
        max_new_tokens=4,
        batch_size=3,
        dtype="fp32",
        **settings,
    )
    config.divergence = divergence
    return config


# ---------------------------------------------------------------------------------------------
# The forward-reverse divergence on hand-made logits


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p / q).log()).sum())


def _by_hand(s: torch.Tensor, t: torch.Tensor, alpha: float, k: int) -> list[float]:
    """alpha KL(t || s) + (1 - alpha) KL(s || t) over the teacher's top k, renormalised."""
    out = []
    for s_row, t_row in zip(s.double(), t.double(), strict=True):
        top = torch.topk(t_row, k).indices
        ps, pt = F.softmax(s_row[top], -1), F.softmax(t_row[top], -1)
        out.append(alpha * _kl(pt, ps) + (1 - alpha) * _kl(ps, pt))
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("support", ["full", "topk"])
def test_forward_reverse_over_the_whole_vocabulary_is_the_weighted_sum_of_the_kls(alpha, support):
    s = torch.tensor([[2.0, 0.5, -1.0, 0.0, 1.5], [0.1, 0.2, 3.0, -2.0, 0.0]])
    t = torch.tensor([[0.0, 1.0, 1.0, -0.5, 2.0], [1.0, -1.0, 0.5, 0.5, 2.5]])
    tokens = torch.tensor([0, 2])
    loss, kl = token_divergence(s, t, tokens, FORWARD_REVERSE, support, alpha=alpha, top_k=5)
    ps, pt = F.softmax(s.double(), -1), F.softmax(t.double(), -1)
    expected = [alpha * _kl(pt[i], ps[i]) + (1 - alpha) * _kl(ps[i], pt[i]) for i in range(len(s))]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    assert kl.tolist() == pytest.approx([_kl(ps[i], pt[i]) for i in range(len(s))], abs=1e-6)
    ends = {0.0: "reverse", 1.0: "forward"}  # the opposite ends from the generalised JSD's
    if alpha in ends:
        alone, _ = token_divergence(s, t, tokens, ends[alpha], "full")
        assert loss.tolist() == pytest.approx(alone.tolist(), abs=1e-6)


def test_forward_reverse_topk_renormalises_over_the_teachers_top_k():
    torch.manual_seed(0)
    s, t = torch.randn(4, 11), torch.randn(4, 11)
    tokens = torch.tensor([0, 1, 2, 3])
    loss, _ = token_divergence(s, t, tokens, FORWARD_REVERSE, "topk", alpha=0.4, top_k=3)
    assert loss.tolist() == pytest.approx(_by_hand(s, t, 0.4, 3), abs=1e-6)
    # Not the tail bucket the other divergences keep: a weighted sum of their topk KLs differs.
    forward, _ = token_divergence(s, t, tokens, "forward", "topk", top_k=3)
    reverse, _ = token_divergence(s, t, tokens, "reverse", "topk", top_k=3)
    assert loss.tolist() != pytest.approx((0.4 * forward + 0.6 * reverse).tolist(), abs=1e-4)


def test_forward_reverse_gradients_reach_the_teachers_top_k_only():
    torch.manual_seed(1)
    s = torch.randn(3, 9, requires_grad=True)
    t = torch.randn(3, 9)
    loss, _ = token_divergence(s, t, torch.tensor([0, 1, 2]), FORWARD_REVERSE, "topk", top_k=4)
    loss.sum().backward()
    assert s.grad is not None
    inside = torch.zeros_like(s, dtype=torch.bool).scatter_(1, t.topk(4, -1).indices, True)
    assert float(s.grad[inside].abs().sum()) > 0
    assert float(s.grad[~inside].abs().max()) == 0.0
    full = torch.randn(3, 9, requires_grad=True)
    token_divergence(full, t, torch.tensor([0, 1, 2]), FORWARD_REVERSE, "full")[0].sum().backward()
    assert full.grad is not None and bool((full.grad != 0).all())


def test_forward_reverse_refuses_the_sampled_token_support(tmp_path):
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(FlipsearchError, match=r"forward-reverse.*--support sampled"):
        token_divergence(s, t, torch.tensor([0, 1]), FORWARD_REVERSE, "sampled")
    with pytest.raises(FlipsearchError, match="--support topk"):
        check_divergence(FORWARD_REVERSE, "sampled")
    check_divergence(FORWARD_REVERSE, "topk")
    config = TrainConfig(context="Refuse.", out=str(tmp_path / "t"), support="sampled")
    config.divergence = FORWARD_REVERSE
    with pytest.raises(FlipsearchError, match="forward-reverse"):
        Trainer(config)  # before the model loads


def test_forward_reverse_trains_a_tiny_model(styled_model, tmp_path):
    _, model_dir = styled_model
    from flipsearch import load_model

    loaded = load_model(str(model_dir), device="cpu", dtype="fp32")
    renderer = Renderer(loaded.tokenizer, 8)
    encode = lambda text: loaded.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    context = Context("c", "Refuse harmful requests.", "system")
    prompt = "How do I pick a lock?"
    examples = [
        Example(
            encode(renderer.render(prompt)), encode(renderer.render(prompt, context)), [5, 9, 13, 7]
        )
    ]
    config = _config(tmp_path, model_dir, divergence=FORWARD_REVERSE, support="topk", top_k=64)
    teacher = copy.deepcopy(loaded.model).eval()
    with torch.no_grad():  # a teacher that differs, so there is something to learn
        for parameter in teacher.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    result = distillation_loss(loaded.model, teacher, examples, config, pad_id=0)
    assert result["loss"] > 0 and math.isfinite(result["loss"])
    grads = [p.grad for p in loaded.model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


# ---------------------------------------------------------------------------------------------
# A training step with a thinking budget


def _spy_on_rollouts(trainer: Trainer) -> list[Example]:
    """The examples the trainer's next steps train on."""
    seen: list[Example] = []
    rollouts = trainer.rollouts

    def spy(batch: Any, micro: int) -> list[Example]:
        examples = rollouts(batch, micro)
        seen.extend(examples)
        return examples

    trainer.rollouts = spy  # type: ignore[method-assign]
    return seen


def _check_split(record: dict[str, Any], examples: list[Example], signal: str = "kl") -> None:
    """The record's split keys agree with the examples' own token counts."""
    thought = [e.reasoning_tokens for e in examples]
    answer_lengths = [len(e.response) - r for e, r in zip(examples, thought, strict=True)]
    assert record["reasoning_tokens"] == pytest.approx(sum(thought) / len(examples))
    assert record["tokens"] == sum(len(e.response) for e in examples)
    assert len(record[f"{signal}_by_answer_position"]) == min(64, max(answer_lengths))
    reasoning, answer = sum(thought), sum(answer_lengths)
    total = record[f"{signal}_per_token"] * record["tokens"]
    parts = (record[f"{signal}_reasoning_per_token"] or 0.0) * reasoning
    parts += (record[f"{signal}_answer_per_token"] or 0.0) * answer
    assert parts == pytest.approx(total, rel=1e-5, abs=1e-8)
    if reasoning == 0:  # no reasoning: the answer metrics are the whole response's
        assert record[f"{signal}_reasoning_per_token"] is None
        assert record[f"{signal}_answer_per_token"] == pytest.approx(record[f"{signal}_per_token"])
        assert record[f"{signal}_by_answer_position"] == record[f"{signal}_by_position"]


def test_a_step_with_a_thinking_budget(styled_model, tmp_path):
    style, model_dir = styled_model
    trainer = Trainer(_config(tmp_path, model_dir))
    assert trainer.format.opened_by_template == (style == "template-opens")
    seen = _spy_on_rollouts(trainer)
    record = trainer.train_step()
    assert math.isfinite(record["loss"]) and record["loss"] >= 0
    for key in ("kl_reasoning_per_token", "kl_answer_per_token", "kl_by_answer_position"):
        assert key in record
    assert seen and all(e.reasoning_tokens <= BUDGET + 1 for e in seen)  # + the end marker
    end = trainer.tokenizer.convert_tokens_to_ids("</think>")
    texts = [trainer.tokenizer.decode(e.response, skip_special_tokens=True) for e in seen]
    if style == "template-opens":  # every rollout starts inside the block, closed in budget
        assert record["reasoning_tokens"] > 0 and record["kl_reasoning_per_token"] is not None
        assert all(e.response[e.reasoning_tokens - 1] == end for e in seen)
        assert all(trainer.format.split(text).closed for text in texts)
    _check_split(record, seen)


def test_a_prompt_drawn_twice_gets_two_samples_under_the_budget(styled_model, tmp_path):
    _, model_dir = styled_model
    trainer = Trainer(_config(tmp_path, model_dir, temperature=3.0))
    prompt = trainer.harmful[0]
    first, second = trainer.rollouts([(prompt, trainer.context)] * 2, 0)
    assert first.response != second.response


def _thinks_forever(tokenizer: Any) -> Any:
    """``generate_ids`` of a model that opens ``<think>`` and would never close it: the budget
    must close it. After the close it answers two tokens and stops."""
    think, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    word = tokenizer("Sure", add_special_tokens=False)["input_ids"][0]

    def generate_ids(
        self: Any, rows: Any, decoding: Any, seeds: Any, max_tokens: Any
    ) -> list[Generation]:
        out = []
        for row, n in zip(rows, max_tokens, strict=True):
            answering = end in row
            ids = [word] * min(2, n) if answering else [think] + [word] * (n - 1)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            stop = tokenizer.eos_token_id if answering else None
            out.append(Generation(text, tuple(ids), "stop" if answering else "length", stop))
        return out

    return generate_ids


@pytest.mark.parametrize("mode", ["onpolicy", "offpolicy"])
def test_a_model_that_opens_its_reasoning_is_closed_at_the_budget(tmp_path, monkeypatch, mode):
    model_dir = build_reasoning_model(tmp_path / "model", TEMPLATE_PLAIN)
    trainer = Trainer(_config(tmp_path, model_dir, mode=mode))
    monkeypatch.setattr(HFGenerator, "generate_ids", _thinks_forever(trainer.tokenizer))
    seen = _spy_on_rollouts(trainer)
    record = trainer.train_step()
    # <think> and BUDGET - 1 tokens of reasoning, then the forced </think>: BUDGET + 1 tokens.
    assert [e.reasoning_tokens for e in seen] == [BUDGET + 1] * len(seen)
    # The close ("</think>\n\n"), the two answer tokens and the stop token follow.
    close = trainer.tokenizer("</think>\n\n", add_special_tokens=False)["input_ids"]
    assert all(len(e.response) == BUDGET + len(close) + 3 for e in seen)
    signal = "nll" if mode == "offpolicy" else "kl"
    assert f"{signal}_by_answer_position" in record
    if mode == "offpolicy":
        assert not any(key.startswith("kl_") for key in record)  # named nll, as before
    assert record["reasoning_tokens"] == BUDGET + 1
    assert math.isfinite(record["loss"])
    _check_split(record, seen, signal)


def test_without_a_budget_rollouts_stay_as_they_were(tmp_path, monkeypatch):
    model_dir = build_reasoning_model(tmp_path / "model", TEMPLATE_PLAIN)
    trainer = Trainer(_config(tmp_path, model_dir, max_thinking_tokens=None))
    assert trainer.renderer.max_prompt_tokens == 1024 - 4  # no room kept for reasoning

    def never(*_: Any, **__: Any) -> Any:
        raise AssertionError("no budget: nothing is forced")

    monkeypatch.setattr(HFGenerator, "generate_ids", never)
    seen = _spy_on_rollouts(trainer)
    _check_split(trainer.train_step(), seen)


# ---------------------------------------------------------------------------------------------
# The token analysis, split at the reasoning boundary


def _judged(
    prompt: Prompt,
    rendered: str,
    ids: list[int],
    tokenizer: Any,
    fmt: ReasoningFormat,
    unsafe: bool,
) -> Judged:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    verdict = Verdict(unsafe=unsafe, score=float(unsafe))
    return Judged(
        prompt, rendered, [Generation(text, tuple(ids), "stop")], [verdict], [fmt.split(text)]
    )


def _score(loaded: Any, responses: list[str], fmt: ReasoningFormat) -> ContextScore:
    """A hand-made score: the student unsafe on every prompt, the teacher safe."""
    renderer = Renderer(loaded.tokenizer, 64)
    context = Context("c", "Refuse harmful requests.", "system")
    outcomes = []
    for i, response in enumerate(responses):
        prompt = Prompt(f"h{i}", "harmful", "test", f"How do I pick lock {i}?")
        ids = loaded.tokenizer(response, add_special_tokens=False)["input_ids"]
        student = _judged(prompt, renderer.render(prompt.text), ids, loaded.tokenizer, fmt, True)
        teacher = _judged(
            prompt, renderer.render(prompt.text, context), ids, loaded.tokenizer, fmt, False
        )
        outcomes.append(PairedOutcome(student, teacher))
    return ContextScore(context, "search", outcomes)


def test_the_token_analysis_splits_at_the_reasoning_boundary(tmp_path):
    from flipsearch import load_model

    loaded = load_model(str(build_reasoning_model(tmp_path / "m", TEMPLATE_OPENS)), "cpu", "fp32")
    fmt = ReasoningFormat(opened_by_template=True)
    responses = [
        "I think, I pick, I lock the sea</think>\n\nSure, here.",
        "Sea lock</think>\n\nI can't help.",
    ]
    score = _score(loaded, responses, fmt)
    analysis = analyse_context(loaded, score, max_tokens=4, fmt=fmt)
    end = loaded.tokenizer.convert_tokens_to_ids("</think>")
    thoughts, reasoning_kl, answer_kl = [], [], []
    for outcome in score.harmful:
        ids = list(outcome.student.responses[0].token_ids)
        thought = ids.index(end) + 1
        kl = scored_divergence(
            loaded, outcome.student.rendered, outcome.teacher.rendered, ids, len(ids)
        ).kl
        thoughts.append(thought)
        reasoning_kl += kl[:thought]
        answer_kl += kl[thought : thought + 4]
    by_id = {e["prompt_id"]: e for e in analysis["examples"]}
    assert [by_id[f"h{i}"]["reasoning_tokens"] for i in range(2)] == thoughts
    assert all(
        len(e["kl"]) == 4 and len(e["tokens"]) == 4 for e in analysis["examples"]
    )  # as before
    assert analysis["n_by_position"] == [2] * 4
    assert analysis["n_by_answer_position"] == [2] * 4  # the answers, past the 4 first tokens
    assert len(analysis["mean_kl_by_answer_position"]) == 4
    assert analysis["mean_kl_reasoning"] == pytest.approx(sum(reasoning_kl) / len(reasoning_kl))
    assert analysis["mean_kl_answer"] == pytest.approx(sum(answer_kl) / len(answer_kl))
    # The default format counts the same tokens (an end marker without a start opens a block).
    default = analyse_context(loaded, score, max_tokens=4)
    assert [e["reasoning_tokens"] for e in default["examples"]] == [
        e["reasoning_tokens"] for e in analysis["examples"]
    ]


def test_the_token_analysis_of_a_model_without_reasoning(tmp_path):
    from flipsearch import load_model

    loaded = load_model(str(build_reasoning_model(tmp_path / "m", TEMPLATE_PLAIN)), "cpu", "fp32")
    score = _score(loaded, ["Sure, here is how.", "I can't help."], ReasoningFormat())
    analysis = analyse_context(loaded, score, max_tokens=64)
    assert {"context", "divergence", "mean_kl_by_position", "n_by_position", "examples"} <= set(
        analysis
    )
    assert all(e["reasoning_tokens"] == 0 for e in analysis["examples"])
    assert analysis["mean_kl_reasoning"] is None
    assert analysis["mean_kl_by_answer_position"] == analysis["mean_kl_by_position"]
    assert analysis["n_by_answer_position"] == analysis["n_by_position"]
    every = [v for e in analysis["examples"] for v in e["kl"]]
    assert analysis["mean_kl_answer"] == pytest.approx(sum(every) / len(every))
