"""Session: one place that builds a run's parts, each only when a path needs it."""

from __future__ import annotations

import pytest

from flipsearch import FlipsearchError, Prompt, RunConfig, TrainConfig
from flipsearch.opsa import Trainer
from flipsearch.session import Session


def test_prompts_and_judges_need_no_model():
    session = Session(model="no-such-model", limit=3, judge="classifier")
    assert [len(session.of_kind(k, session.prompts)) for k in ("harmful", "benign")] == [3, 3]
    assert session.judge("refusal").name == "refusal"
    assert "loaded" not in session.__dict__  # nothing asked for the weights
    with pytest.raises(FlipsearchError):
        _ = session.loaded


def test_prompt_objects_and_duplicate_ids():
    prompts = [Prompt("a", "harmful", "c", "x"), Prompt("a", "benign", "c", "y")]
    with pytest.raises(FlipsearchError, match="prompt id 'a' is also at another prompt file"):
        _ = Session(prompts=prompts).prompts
    with pytest.raises(FlipsearchError, match="not a mix"):
        _ = Session(prompts=[prompts[0], "builtin:harmful"]).prompts


def test_a_run_config_opens_its_own_cache_and_backend(tiny_model, tmp_path):
    config = RunConfig(out=str(tmp_path / "run"), max_new_tokens=5, seed=3, batch_size=7)
    with Session.from_config(config, model=tiny_model) as session:
        assert session.decoding.max_new_tokens == 5 and session.decoding.seed == 3
        evaluator = session.evaluator()
        assert evaluator.generator is session.generator and evaluator.cache is session.cache
        assert session.generator.batch_size == 7
    assert (tmp_path / "run" / "generations.sqlite").is_file()


def test_training_uses_the_configured_judges_and_starts_above_zero(tiny_model_dir, tmp_path):
    config = TrainConfig(
        context="Refuse harmful requests.",
        out=str(tmp_path / "t"),
        model=str(tiny_model_dir),
        judge="ensemble:any:refusal+refusal",
        limit=4,
        warmup_steps=2,
        lr=1e-4,
    )
    trainer = Trainer(config)
    assert trainer.session.judge("safety").name == "ensemble:any:refusal+refusal"
    assert len(trainer.harmful) == 4
    # transformers' warm-up starts at 0; flipsearch's first step already trains.
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.5e-4)
