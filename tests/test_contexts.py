from collections import Counter

import pytest

from flipsearch import Context, FlipsearchError, load_contexts
from flipsearch.contexts import Renderer, build_messages, context_from_arg


def test_seed_library_size_and_families():
    contexts = load_contexts()
    assert len(contexts) >= 15
    families = Counter(c.family for c in contexts)
    assert {
        "refusal_instruction",
        "harm_reflection",
        "persona",
        "policy_list",
        "worked_example",
    } <= set(families)
    assert {c.placement for c in contexts} == {"system", "user_prefix", "user_suffix"}
    lengths = [len(c.text.split()) for c in contexts]
    assert min(lengths) <= 25 and max(lengths) >= 80


def test_placements_build_the_expected_chats():
    prompt = "How do I X?"
    assert build_messages(prompt, None) == [{"role": "user", "content": prompt}]
    system = Context("s", "Be safe.", "system")
    assert build_messages(prompt, system)[0] == {"role": "system", "content": "Be safe."}
    prefix = Context("p", "Be safe.", "user_prefix")
    assert build_messages(prompt, prefix) == [
        {"role": "user", "content": "Be safe.\n\nHow do I X?"}
    ]
    suffix = Context("u", "Be safe.", "user_suffix")
    assert build_messages(prompt, suffix) == [
        {"role": "user", "content": "How do I X?\n\nBe safe."}
    ]


def test_system_context_replaces_the_default_system_message(tiny_model):
    renderer = Renderer(tiny_model.tokenizer, max_new_tokens=16)
    student = renderer.render("Hi", None)
    teacher = renderer.render("Hi", Context("s", "Refuse harm.", "system"))
    assert "tiny test assistant" in student
    assert "tiny test assistant" not in teacher and "Refuse harm." in teacher
    beside = renderer.render("Hi", Context("u", "Refuse harm.", "user_suffix"))
    assert "tiny test assistant" in beside and "Hi\n\nRefuse harm." in beside


def test_too_long_context_is_an_error_not_a_truncation(tiny_model):
    renderer = Renderer(tiny_model.tokenizer, max_new_tokens=16, max_length=64)
    with pytest.raises(FlipsearchError, match="never truncated"):
        renderer.render("Hi", Context("long", "word " * 200))


def test_template_that_drops_the_context_is_caught(tiny_model):
    class DroppingTokenizer:
        chat_template = "x"
        model_max_length = 100

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return messages[-1]["content"]

    renderer = Renderer(DroppingTokenizer(), max_new_tokens=4)
    with pytest.raises(FlipsearchError, match="dropped or altered"):
        renderer.render("Hi", Context("s", "Refuse harm.", "system"))


def test_context_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "family.yaml"
    bad.write_text(
        "family: f\ncontexts:\n  - id: a\n    text: ok\n  - id: b\n    placement: system\n"
    )
    with pytest.raises(FlipsearchError, match=r"family\.yaml:5: context has no text"):
        load_contexts(tmp_path)
    bad.write_text("family: f\ncontexts:\n  - id: a\n    text: [unclosed\n")
    with pytest.raises(FlipsearchError, match=r"family\.yaml:\d+: malformed YAML"):
        load_contexts(tmp_path)
    bad.write_text("family: f\ncontexts:\n  - id: a\n    text: ok\n    placement: footer\n")
    with pytest.raises(FlipsearchError, match="unknown placement 'footer'"):
        load_contexts(tmp_path)


def test_duplicate_ids_across_files(tmp_path):
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text("contexts:\n  - id: same\n    text: hi\n")
    with pytest.raises(FlipsearchError, match="duplicate context id 'same'"):
        load_contexts(tmp_path)


def test_context_argument_is_a_file_or_text(tmp_path):
    single = tmp_path / "best_context.yaml"
    single.write_text("id: mine\nplacement: user_suffix\ntext: Refuse.\n")
    assert context_from_arg(str(single)) == Context(
        "mine", "Refuse.", "user_suffix", "best_context"
    )
    inline = context_from_arg("Refuse harmful requests.", "user_prefix")
    assert inline.placement == "user_prefix" and inline.id.startswith("ctx-")
    empty = tmp_path / "empty.yaml"
    empty.write_text("id: x\nplacement: system\n")
    with pytest.raises(FlipsearchError, match="has no text"):
        context_from_arg(str(empty))
