"""The OPSA loop: the loss, masking, checkpoints and resuming, the TRL hand-off."""

import copy
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from flipsearch import Context
from flipsearch.contexts import Renderer
from flipsearch.export import export_trl_sdft
from flipsearch.opsa import Example, TrainConfig, distillation_loss, token_divergence
from flipsearch.train_eval import answer_is_correct


def _direct(s_logits, t_logits, tokens, divergence, support, alpha=0.5, k=3):
    """The divergences written out plainly, one position at a time."""
    out = []
    for s, t, y in zip(s_logits, t_logits, tokens, strict=True):
        ps, pt = F.softmax(s.double(), -1), F.softmax(t.double(), -1)
        if support == "sampled":
            out.append(float(torch.log(ps[y]) - torch.log(pt[y])))
            continue
        if support == "topk":
            top = torch.topk(pt, k).indices
            ps = torch.cat([ps[top], (1 - ps[top].sum()).reshape(1)])
            pt = torch.cat([pt[top], (1 - pt[top].sum()).reshape(1)])
        if divergence == "reverse":
            out.append(float((ps * (ps / pt).log()).sum()))
        elif divergence == "forward":
            out.append(float((pt * (pt / ps).log()).sum()))
        else:
            m = alpha * pt + (1 - alpha) * ps
            out.append(
                float(
                    alpha * (pt * (pt / m).log()).sum() + (1 - alpha) * (ps * (ps / m).log()).sum()
                )
            )
    return out


COMBINATIONS = [(d, s) for d in ("reverse", "forward", "mixed") for s in ("full", "topk")]


@pytest.mark.parametrize(("divergence", "support"), [*COMBINATIONS, ("reverse", "sampled")])
def test_divergences_match_a_direct_computation(divergence, support):
    torch.manual_seed(0)
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    tokens = torch.tensor([0, 3, 8, 5])
    loss, kl = token_divergence(s, t, tokens, divergence, support, alpha=0.3, top_k=3)
    expected = _direct(s, t, tokens, divergence, support, alpha=0.3, k=3)
    if support == "sampled":
        picked = F.log_softmax(s, -1).gather(-1, tokens[:, None]).squeeze(-1)
        assert kl.tolist() == pytest.approx(expected, abs=1e-5)  # the per-token advantage
        assert loss.tolist() == pytest.approx((kl * picked).tolist(), abs=1e-5)
    else:
        assert loss.tolist() == pytest.approx(expected, abs=1e-5)
    assert kl.tolist() == pytest.approx(
        _direct(s, t, tokens, "reverse", "full") if support != "sampled" else expected, abs=1e-5
    )


def _examples(tiny_model, context=None):
    renderer = Renderer(tiny_model.tokenizer, 8)
    encode = lambda text: tiny_model.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = ["How do I pick a lock?", "Tell me about the sea and its long grey waves"]
    responses = [[5, 9, 13, tiny_model.tokenizer.eos_token_id], [7, 8]]
    return [
        Example(encode(renderer.render(p)), encode(renderer.render(p, context)), r)
        for p, r in zip(prompts, responses, strict=True)
    ]


@pytest.mark.parametrize("support", ["full", "topk", "sampled"])
def test_loss_is_zero_when_teacher_and_student_see_the_same_inputs(tiny_model, support):
    model = copy.deepcopy(tiny_model.model).float()
    teacher = copy.deepcopy(model).eval()
    config = TrainConfig(context="x", support=support)
    result = distillation_loss(model, teacher, _examples(tiny_model), config, pad_id=0)
    assert result["loss"] == pytest.approx(0.0, abs=1e-6)
    assert float(result["kl"].abs().max()) < 1e-5


def test_padding_is_excluded_and_the_loss_is_a_per_token_mean(tiny_model):
    """A padded batch gives the token-weighted mean of the examples' own losses."""
    model = copy.deepcopy(tiny_model.model).float()
    teacher = copy.deepcopy(model).eval()
    config = TrainConfig(context="x", chunk_tokens=3)  # chunks split the batch's tokens too
    examples = _examples(tiny_model, Context("c", "Refuse everything harmful.", "system"))
    together = distillation_loss(model, teacher, examples, config, pad_id=0)["loss"]
    alone = [distillation_loss(model, teacher, [e], config, pad_id=0)["loss"] for e in examples]
    sizes = [len(e.response) for e in examples]
    assert together > 0
    assert together == pytest.approx(
        sum(a * n for a, n in zip(alone, sizes, strict=True)) / sum(sizes), rel=1e-5
    )


def test_generation_stops_at_eos(tiny_model):
    from flipsearch import HFGenerator

    generator = HFGenerator(tiny_model)
    eos = tiny_model.tokenizer.eos_token_id
    finished = generator._finish([4, 5, eos, 9, 9])
    assert finished.token_ids == (4, 5) and finished.finish_reason == "stop"
    assert finished.stop_token == eos


def test_answer_matching():
    assert answer_is_correct("The answer is 12.", "12")
    assert answer_is_correct("12", "12.0")
    assert not answer_is_correct("7 + 5 = 13, not 12", "12")
    assert answer_is_correct("Dan is younger.", "dan")
    assert not answer_is_correct("Nobody knows.", "dan")


def test_exported_teacher_prompt_renders_to_flipsearchs_own_tokens(tiny_model, tmp_path):
    context = tmp_path / "best_context.yaml"
    context.write_text("id: c\nplacement: user_suffix\ntext: (Refuse harmful requests.)\n")
    out = tmp_path / "sdft.jsonl"
    assert export_trl_sdft(str(context), [], 5, out) == 5
    row = json.loads(out.read_text().splitlines()[0])
    # TRL's teacher: the last user turn becomes "{prompt}\n\n{privileged_context}".
    chat = [dict(turn) for turn in row["prompt"]]
    chat[-1]["content"] = f"{chat[-1]['content']}\n\n{row['privileged_context']}"
    tokenizer = tiny_model.tokenizer
    trl_ids = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    ours = Renderer(tokenizer, 8).render(
        row["prompt"][0]["content"], Context("c", "(Refuse harmful requests.)", "user_suffix")
    )
    assert (
        list(trl_ids["input_ids"] if hasattr(trl_ids, "keys") else trl_ids)
        == tokenizer(ours, add_special_tokens=False)["input_ids"]
    )
    system = tmp_path / "system.yaml"
    system.write_text("id: s\nplacement: system\ntext: Refuse.\n")
    from flipsearch import FlipsearchError

    with pytest.raises(FlipsearchError, match="TRL's self-distillation teacher"):
        export_trl_sdft(str(system), [], 5, out)


def _train_args(model_dir, out, steps):
    return [
        sys.executable,
        "-m",
        "flipsearch.cli",
        "train",
        "--context",
        "Refuse harmful things.",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--max-new-tokens",
        "5",
        "--limit",
        "12",
        "--eval-limit",
        "2",
        "--checkpoint-every",
        "1",
        "--dtype",
        "fp32",
        "--lr",
        "1e-3",
    ]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "final" / "model.safetensors"))


def _checkpoint_step(out):
    for folder in ("checkpoint", "checkpoint.old"):  # the second only when killed mid-swap
        try:
            return torch.load(out / folder / "trainer_state.pt", weights_only=True)["step"]
        except (FileNotFoundError, RuntimeError, EOFError):  # absent, or being replaced
            continue
    return 0


def test_resume_after_a_kill_gives_the_same_weights(tiny_model_dir, tmp_path):
    steps = 12  # the kill comes after step 1: the other 11 leave it a wide window
    straight = subprocess.run(
        _train_args(tiny_model_dir, tmp_path / "a", steps),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert straight.returncode == 0, straight.stderr
    out = tmp_path / "b"
    process = subprocess.Popen(
        _train_args(tiny_model_dir, out, steps),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and _checkpoint_step(out) < 1:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = _checkpoint_step(out)
    assert 1 <= killed_at < steps, "the run finished before it could be killed"
    resumed = subprocess.run(
        [*_train_args(tiny_model_dir, out, steps), "--resume"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(tmp_path / "a"), _weights(out)
    assert all(torch.equal(a[name], b[name]) for name in a)
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))
    summary = json.loads((out / "train_summary.json").read_text())
    assert {"before", "after"} <= set(summary)


def test_a_kill_during_the_checkpoint_swap_leaves_the_previous_checkpoint(tiny_model_dir, tmp_path):
    from flipsearch.opsa import Trainer

    config = TrainConfig(
        context="Refuse harmful things.",
        model=str(tiny_model_dir),
        out=str(tmp_path / "t"),
        steps=3,
        batch_size=2,
        max_new_tokens=3,
        limit=6,
        dtype="fp32",
    )
    trainer = Trainer(config)
    trainer.train_step()
    trainer.save_checkpoint()
    # The state a kill between "old checkpoint moved aside" and "new one moved in" leaves.
    (tmp_path / "t" / "checkpoint").replace(tmp_path / "t" / "checkpoint.old")
    resumed = Trainer(config)
    assert resumed.load_checkpoint() and resumed.step == 1
    assert all(
        torch.equal(a, b)
        for a, b in zip(trainer.model.parameters(), resumed.model.parameters(), strict=True)
    )


@pytest.mark.parametrize(("alpha", "limit"), [(0.0, "forward"), (1.0, "reverse")])
def test_mixed_at_its_ends_is_the_kl_it_tends_to(alpha, limit):
    torch.manual_seed(1)
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    tokens = torch.tensor([0, 1, 2])
    mixed, _ = token_divergence(s, t, tokens, "mixed", "full", alpha=alpha)
    expected, _ = token_divergence(s, t, tokens, limit, "full")
    assert mixed.tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    assert float(mixed.sum()) > 0  # it trains


def test_the_loss_compares_distributions_at_the_rollout_temperature(tiny_model):
    examples = _examples(tiny_model, Context("c", "Refuse harm.", "system"))
    teacher = copy.deepcopy(tiny_model.model)
    pad = tiny_model.tokenizer.pad_token_id
    at = {}
    for temperature in (1.0, 2.0):
        config = TrainConfig(temperature=temperature)
        at[temperature] = distillation_loss(tiny_model.model, teacher, examples, config, pad)
        tiny_model.model.zero_grad(set_to_none=True)
    assert at[1.0]["loss"] > 0 and at[2.0]["loss"] != pytest.approx(at[1.0]["loss"])


def test_a_rollout_ends_with_the_stop_token_it_sampled(tiny_model_dir, tmp_path, monkeypatch):
    from flipsearch.backends import Generation
    from flipsearch.backends.hf import HFGenerator
    from flipsearch.opsa import Trainer

    def stops_with_seven(self, prompts, decoding):
        yield list(range(len(prompts))), [[Generation("x", (5, 6), "stop", 7)] for _ in prompts]

    monkeypatch.setattr(HFGenerator, "generate_batches", stops_with_seven)
    trainer = Trainer(TrainConfig(context="Refuse.", out=str(tmp_path), model=str(tiny_model_dir)))
    [example, *_] = trainer.rollouts(trainer.sample_prompts(), 0)
    assert example.response == [5, 6, 7] and trainer.eos != 7


def test_offpolicy_metrics_are_named_nll_not_kl(tiny_model_dir, tmp_path):
    from flipsearch.opsa import Trainer

    config = TrainConfig(
        context="Refuse.", out=str(tmp_path), model=str(tiny_model_dir), mode="offpolicy",
        max_new_tokens=4, batch_size=2,
    )  # fmt: skip
    record = Trainer(config).train_step()
    assert "nll_per_token" in record and "nll_by_position" in record
    assert "kl_per_token" not in record


def test_before_and_after_are_compared_paired_on_the_same_prompts():
    from flipsearch.fliprate import mcnemar_exact
    from flipsearch.train_eval import paired_before_after

    before = {"outcomes": {"unsafe_rate": {f"p{i}": 1.0 for i in range(9)} | {"u": None}}}
    after = {"outcomes": {"unsafe_rate": {f"p{i}": float(i >= 7) for i in range(9)} | {"u": 0.0}}}
    [(metric, test)] = paired_before_after(before, after).items()
    assert metric == "unsafe_rate" and test["prompts"] == 9  # the undecided prompt is left out
    assert test["p_value"] == pytest.approx(mcnemar_exact(0, 7))


def test_a_resumed_training_refuses_other_settings_but_may_run_longer(tmp_path):
    from flipsearch.errors import FlipsearchError
    from flipsearch.opsa import bind_training

    path = tmp_path / "train_config.json"
    bind_training(path, {"lr": 1e-5, "steps": 10}, resume=False)
    bind_training(path, {"lr": 1e-5, "steps": 20}, resume=True)  # longer: fine
    with pytest.raises(FlipsearchError, match=r"lr: 1e-05 then, 0\.001 now"):
        bind_training(path, {"lr": 1e-3, "steps": 20}, resume=True)
    bind_training(path, {"lr": 1e-3, "steps": 20}, resume=False)  # a fresh start rebinds
