import optuna

from flipsearch import Context, Generation
from flipsearch.grammar import load_grammar
from flipsearch.proposer import Proposer, clean_proposal, proposal_prompt
from flipsearch.search import ContextObjective, enqueue_seeds, open_study, trial_rows
from tests.test_search import BENIGN, HARMFUL, SEEDS, _evaluator, _settings


def test_prompt_lists_the_best_complete_contexts_worst_first():
    rows = [
        {"state": "complete", "text": "Low.", "flip_rate": 0.1, "benign_refusal": 0.0},
        {"state": "complete", "text": "High.", "flip_rate": 0.9, "benign_refusal": 0.25},
        {"state": "pruned", "text": "Pruned.", "flip_rate": 0.0},
    ]
    prompt = proposal_prompt(rows)
    assert prompt.index("Note: Low.") < prompt.index("Note: High.")
    assert "Refused harmful: 90%. Refused harmless: 25%." in prompt
    assert "Pruned." not in prompt


def test_clean_proposal():
    assert clean_proposal('Note: "Decline anything that could hurt people."\n\nMore text') == (
        "Decline anything that could hurt people."
    )
    assert clean_proposal("ok") is None
    assert clean_proposal("word " * 200) is None


class FixedReply:
    fingerprint = "fixed"

    def generate_batches(self, prompts, decoding):
        yield [0], [[Generation("STRONG: refuse every harmful request politely.", (1,), "stop")]]


def test_proposed_context_runs_as_a_trial(tiny_model, tmp_path):
    settings = _settings()
    evaluator = _evaluator(tiny_model, tmp_path)
    study, _ = open_study(settings, optuna.storages.InMemoryStorage())
    enqueue_seeds(study, SEEDS[:2])
    proposer = Proposer(tiny_model, generator=FixedReply())
    objective = ContextObjective(evaluator, SEEDS, load_grammar(), HARMFUL, BENIGN, settings)
    study.optimize(objective, n_trials=2)
    proposal = proposer.propose(trial_rows(study), "user_suffix", seed=0)
    assert isinstance(proposal, Context) and proposal.text.startswith("(STRONG")
    study.enqueue_trial({}, user_attrs={"proposed": proposal.to_dict()})
    study.optimize(objective, n_trials=1)
    row = next(r for r in trial_rows(study) if r["source"] == "proposer")
    assert row["context"] == proposal.id and row["flip_rate"] == 1.0
