import pytest
import torch

from flipsearch import Decoding, HFGenerator
from flipsearch.contexts import Context, Renderer
from flipsearch.scoring import response_logits, token_divergence


def _greedy(tiny_model, prompt: str, n: int = 10):
    [(_, [[generation]])] = list(HFGenerator(tiny_model).generate_batches([prompt], Decoding(n)))
    return generation


def test_response_logits_are_aligned_with_the_generated_tokens(tiny_model):
    renderer = Renderer(tiny_model.tokenizer, 10)
    prompt = renderer.render("Tell me about boats")
    generation = _greedy(tiny_model, prompt)
    ids = tiny_model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    logits = response_logits(tiny_model, ids, generation.token_ids)
    # Greedy decoding picked the argmax at every position: row i must predict token i.
    assert logits.argmax(-1).tolist() == list(generation.token_ids)


def test_kl_is_zero_for_identical_prompts_and_positive_otherwise(tiny_model):
    renderer = Renderer(tiny_model.tokenizer, 10)
    student = renderer.render("Tell me about boats")
    teacher = renderer.render("Tell me about boats", Context("c", "Refuse everything.", "system"))
    response = _greedy(tiny_model, student).token_ids
    same = token_divergence(tiny_model, student, student, response)
    assert same.kl == pytest.approx([0.0] * len(response), abs=1e-5)
    different = token_divergence(tiny_model, student, teacher, response)
    assert max(different.kl) > 1e-4
    assert len(different.tokens) == len(response)
    # Teacher log-probs agree with a direct forward pass over the teacher prompt.
    ids = tiny_model.tokenizer(teacher, add_special_tokens=False)["input_ids"]
    direct = torch.log_softmax(response_logits(tiny_model, ids, response), -1)
    expected = direct[torch.arange(len(response)), torch.tensor(response)].tolist()
    assert different.teacher_logprob == pytest.approx(expected, abs=1e-5)
