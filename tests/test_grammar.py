import optuna
import pytest

from flipsearch import FlipsearchError
from flipsearch.grammar import load_grammar

FULL = {
    "length": "long",
    "role": "careful",
    "watch_for": "list",
    "decide": "ask_yourself",
    "refuse": "sorry_exact",
    "example": "one_pair",
    "helpful": "keep_helping",
    "tone": "brief",
    "placement": "user_suffix",
}


def test_shipped_grammar_composes_reproducibly():
    grammar = load_grammar()
    first, again = grammar.compose(FULL), grammar.compose(dict(FULL))
    assert first == again and first.id.startswith("g-")
    assert (
        first.placement == "user_suffix" and first.text.startswith("(") and "Example:" in first.text
    )
    other = grammar.compose({**FULL, "refuse": "polite"})
    assert other.id != first.id
    assert grammar.size() >= 1000


def test_conditional_components_only_apply_on_their_branch():
    grammar = load_grammar()
    short = grammar.compose({**FULL, "length": "short"})
    assert "Example:" not in short.text and "Before answering" not in short.text
    # An inactive component's value does not change the context.
    assert short == grammar.compose({**FULL, "length": "short", "example": "two_pairs"})


def test_optuna_suggests_only_active_components():
    grammar = load_grammar()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen_long = seen_short = False
    for _ in range(30):
        trial = study.ask()
        context = grammar.suggest(trial)
        if trial.params["length"] == "short":
            seen_short = True
            assert "example" not in trial.params and "decide" not in trial.params
        else:
            seen_long = True
            assert "example" in trial.params
        assert context == grammar.compose(trial.params)
        study.tell(trial, 0.0)
    assert seen_long and seen_short


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("grammar: {}\n", "expected 'grammar' with 'components'"),
        ("grammar:\n  components:\n    role: {}\n", "needs 'options'"),
        (
            "grammar:\n  components:\n    role:\n      options: {a: x}\n      when: {nope: [b]}\n",
            "condition on unknown",
        ),
        (
            "grammar:\n  order: [ghost]\n  components:\n    role:\n      options: {a: x}\n",
            "unknown components",
        ),
    ],
)
def test_bad_grammar_files(tmp_path, body, message):
    path = tmp_path / "grammar.yaml"
    path.write_text(body)
    with pytest.raises(FlipsearchError, match=message):
        load_grammar(path)
