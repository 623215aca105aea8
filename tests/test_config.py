"""RunConfig in sections; every CLI option declared once and landing in its field by name."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
from typer.testing import CliRunner

from flipsearch import FlipsearchError, RunConfig, TrainConfig
from flipsearch import cli as cli_module
from flipsearch.config import SECTIONS, TOP_LEVEL, DecodingConfig, setting_names


def test_flat_settings_land_in_their_sections():
    config = RunConfig(
        out="r",
        limit=8,
        max_new_tokens=16,
        judge="classifier",
        trials=3,
        top_k=2,
        backend="openai",
        base_url=["http://a/v1"],
        train=True,
    )
    assert config.decoding.max_new_tokens == 16 and config.judges.judge == "classifier"
    assert config.search.trials == 3 and config.selection.top_k == 2
    assert config.backend.backend == "openai"
    assert config.backend.spec().options.base_url == ("http://a/v1",)
    assert config.training.train and config.limit == 8


def test_a_section_can_be_given_whole_but_not_twice():
    config = RunConfig(decoding=DecodingConfig(max_new_tokens=9))
    assert config.decoding.max_new_tokens == 9
    with pytest.raises(FlipsearchError, match="in the section or by name, not both"):
        RunConfig(decoding=DecodingConfig(), max_new_tokens=3)


def test_unknown_and_misplaced_settings_are_clear_errors():
    with pytest.raises(FlipsearchError, match="unknown setting 'max_tokens'"):
        RunConfig(max_tokens=3)
    with pytest.raises(FlipsearchError, match="--vllm-arg is for --backend vllm"):
        RunConfig(vllm_args={"tensor_parallel_size": 2})


def test_config_json_round_trips():
    config = RunConfig(limit=4, samples=2, temperature=0.7, storage="journal:x.journal")
    again = RunConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert set(config.to_dict()) == {"out", "model", "prompts", "contexts", "limit", "seed"} | set(
        SECTIONS
    )


def test_setting_names_are_unique_across_sections():
    names = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))
    assert not set(names) & set(TOP_LEVEL)


def _options(command) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(command).parameters)


def test_run_takes_every_setting_with_the_declared_default():
    options = _options(cli_module.run)
    assert set(options) == set(setting_names()) | set(TOP_LEVEL)
    defaults = RunConfig()
    assert options["max_new_tokens"].default == defaults.decoding.max_new_tokens
    assert options["trials"].default == defaults.search.trials
    assert options["max_benign_refusal"].default == defaults.selection.max_benign_refusal
    assert options["out"].default == defaults.out
    score = _options(cli_module.score)
    assert "trials" not in score and "context" in score and score["out"].default == "runs/score"


def test_train_takes_every_training_setting():
    options = _options(cli_module.train_command)
    assert set(options) == {f.name for f in dataclasses.fields(TrainConfig)} | {"resume"}


@pytest.fixture
def captured(monkeypatch):
    seen: list[RunConfig] = []

    def fake_run(config, contexts=None, console=None):
        seen.append(config)
        raise FlipsearchError("captured")

    monkeypatch.setattr(cli_module, "run_pipeline", fake_run)
    return seen


def test_cli_options_reach_their_fields(captured):
    args = [
        "run",
        "--out=o",
        "--limit=5",
        "--max-new-tokens=7",
        "--judge=classifier",
        "--trials=2",
        "--no-multi-objective",
        "--backend=vllm",
        "--vllm-arg=tensor_parallel_size=2",
        "--prompts=a.jsonl",
        "--prompts=b.jsonl",
        "--train",
        "--train-steps=3",
    ]
    result = CliRunner().invoke(cli_module.app, args)
    assert isinstance(result.exception, FlipsearchError), result.output
    [config] = captured
    assert (config.out, config.limit, config.prompts) == ("o", 5, ["a.jsonl", "b.jsonl"])
    assert config.decoding.max_new_tokens == 7 and config.judges.judge == "classifier"
    assert config.search.trials == 2 and not config.search.multi_objective
    assert config.backend.options == {"vllm_args": {"tensor_parallel_size": 2}}
    assert config.training.train and config.training.train_steps == 3


def test_a_backend_option_for_another_backend_is_refused(captured):
    result = CliRunner().invoke(cli_module.app, ["run", "--base-url=http://a/v1"])
    assert "--base-url is for --backend openai" in str(result.exception)
    assert not captured


def test_run_train_takes_the_runs_own_settings():
    run = RunConfig(
        out="runs/x",
        model="m",
        prompts=["p.jsonl"],
        limit=6,
        seed=4,
        max_new_tokens=20,
        judge="classifier",
        refusal_judge="classifier",
        train_steps=7,
    )
    train = TrainConfig.after_run(run)
    assert (train.model, train.prompts, train.limit, train.seed) == ("m", ["p.jsonl"], 6, 4)
    assert (train.judge, train.refusal_judge, train.steps) == ("classifier", "classifier", 7)
    assert train.max_new_tokens == 20
    assert train.context.endswith("best_context.yaml") and train.out.endswith("train")
