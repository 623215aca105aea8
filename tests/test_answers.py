"""Answer extraction and grading (flipsearch.answers), and GSM8K/MATH files via load_prompts.

Every problem here is written for this test; none is a dataset row.
"""

import json
from fractions import Fraction

import pytest

from flipsearch import FlipsearchError, load_prompts
from flipsearch.answers import (
    extract_answer,
    is_correct,
    last_boxed,
    looks_multiple_choice,
    normalize_answer,
    parse_number,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # boxed: the last complete one, nested braces balanced
        (r"so $x = \boxed{7}$", "7"),
        (r"first \boxed{3}, then \boxed{\frac{2}{4}}", "0.5"),
        (r"\boxed{\text{x}^{2}+1}", "x^{2}+1"),
        (r"\boxed{\left( 1, 2 \right)}", "(1,2)"),
        (r"\boxed{4} and a cut-off \boxed{5", "4"),  # the last box never closed
        (r"\fbox{9}", "9"),
        # GSM8K
        ("He pays 3 * 4 = 12 dollars.\n#### 12", "12"),
        ("In all 2,500 + 500.\n#### 3,000", "3000"),
        ("#### $18.00", "18"),
        # "the answer is X" / "answer: X", the last one
        ("The answer is 42.", "42"),
        ("My first answer is 3. No, the answer is 5.", "5"),
        ("**Final Answer:** 3.50", "3.5"),
        ("Answer: -7", "-7"),
        ("THE ANSWER IS Paris.", "paris"),
        (r"The final answer is $\dfrac{3}{4}$.", "0.75"),
        ("The answer is 12 apples", "12 apples"),
        # the last number
        ("Three then 12.0 in the end", "12"),
        ("10-3 = 7", "7"),
        ("so x = -3", "-3"),
        ("It grew by 25%", "25"),
        ("a total of +5", "5"),
        ("about 1,250 people", "1250"),
        ("half is 1/2", "0.5"),
        (r"the ratio is \frac{1}{3}", "1/3"),
        # no answer at all
        ("I do not know.", None),
        ("", None),
        ("   \n ", None),
    ],
)
def test_extraction_table(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "style", "expected"),
    [
        (r"\boxed{1} then 7", "boxed", "1"),
        (r"\boxed{1} then 7", "number", "7"),
        ("#### 4\nThe answer is 5", "gsm8k", "4"),
        ("#### 4\nThe answer is 5", "phrase", "5"),
        ("no box here 3", "boxed", None),
    ],
)
def test_one_style_at_a_time(text, style, expected):
    assert extract_answer(text, style) == expected


def test_the_styles_go_most_explicit_first():
    text = "The answer is 5. Check: 2 + 3 = 5, and 6 is wrong.\n#### 5"
    assert extract_answer(text) == "5"  # the GSM8K line, not the last number (6)
    assert extract_answer(r"The answer is 4, i.e. \boxed{8}") == "8"
    with pytest.raises(ValueError, match="unknown answer style"):
        extract_answer("1", "roman")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", "B"),
        ("(c)", "C"),
        ("**D.**", "D"),
        ("The answer is (C).", "C"),
        ("answer: D", "D"),
        ("B) because the other options are too small", "B"),
        ("Option (A) is 3 and (B) is 4, so (B)", "B"),
        ("I think A) is wrong and C) is right", "C"),
        (r"\boxed{\text{(E)}}", "E"),
        ("A train leaves at noon.", None),  # "A" the word is no choice
        ("I cannot tell.", None),
    ],
)
def test_choice_letters(text, expected):
    assert extract_answer(text, choices=True) == expected
    if expected is not None:
        assert is_correct(text, expected, choices=True)
        assert not is_correct(text, "J", choices=True)


def test_multiple_choice_is_told_by_the_reference_and_the_options():
    question = "Which is largest?\n(A) 3\n(B) 9\n(C) 5"
    assert looks_multiple_choice(question, "B") and looks_multiple_choice(question, "(B)")
    assert not looks_multiple_choice(question, "9")  # the reference is not a letter
    assert not looks_multiple_choice("Which letter follows Z's neighbour Y?", "Z")
    assert not looks_multiple_choice(question, "F")  # no option F


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (r"\frac{1}{2}", "1/2"),
        ("1/2", "0.5"),
        (r"\dfrac{1}{2}", ".5"),
        ("$1,000", "1000"),
        ("12.0", "12"),
        ("+3", "3"),
        ("40%", "40"),
        (r"\$5", "5.00"),
        (r"-\frac{3}{2}", "-1.5"),
        ("\u22124", "-4"),
        (r"\text{ Paris }", "paris"),
        (r"\left[ 1, 2 \right]", "[1,2]"),
        ("x^2 + 1", "x^2+1"),
    ],
)
def test_normalisation_makes_equal_answers_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)
    assert is_correct(a, b)


def test_numbers_are_exact_fractions():
    assert parse_number(r"\frac{2}{6}") == Fraction(1, 3)
    assert parse_number("0.333") != Fraction(1, 3)
    assert parse_number("1/0") is None and parse_number("5 cm") is None
    assert parse_number("x") is None


def test_grading_numbers():
    assert is_correct("Seven and five make 12.", "12")
    assert is_correct("The answer is 12 apples, since 7 + 5 = 12.", "12")
    assert is_correct("#### 1,000", "1000")
    assert not is_correct("The answer is 13.", "12")
    assert not is_correct("I am not sure.", "12")
    assert not is_correct("", "12") and not is_correct(None, "12")


def test_grading_words_reads_the_start_of_an_unmarked_answer():
    assert is_correct("Yes, Tom is an animal.", "yes")
    assert is_correct("Dan is younger.", "dan")
    assert is_correct("The answer is: no.", "no")
    assert not is_correct("Nobody knows.", "no")  # a whole word, not a prefix
    assert not is_correct("No.", "yes")
    assert is_correct(r"so \boxed{\text{Tuesday}}", "tuesday")


def test_last_boxed_balances_nested_braces():
    assert last_boxed(r"\boxed{\frac{a}{b^{2}}} end") == r"\frac{a}{b^{2}}"
    assert last_boxed(r"\boxed{}") is None and last_boxed("none") is None


# -- GSM8K- and MATH-style prompt files -------------------------------------------------------
def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_gsm8k_rows_become_reasoning_prompts_with_their_worked_answer(tmp_path):
    worked = "Each box has 6 pens, so 4 boxes have <<4*6=24>>24 pens.\n#### 24"
    path = _write(
        tmp_path / "pens.jsonl",
        [
            {"question": "A box holds 6 pens. How many pens are in 4 boxes?", "answer": worked},
            {"question": "What is 1,200 + 300?", "answer": "1,200 + 300 = 1,500\n#### 1,500",
             "id": "sum", "category": "addition"},
        ],
    )  # fmt: skip
    first, second = load_prompts(path)
    assert (first.kind, first.id, first.category) == ("reasoning", "pens-1", "uncategorised")
    assert first.text.startswith("A box holds") and first.answer == "24"
    assert first.solution == worked
    assert (second.id, second.category, second.answer) == ("sum", "addition", "1,500")
    assert first.to_dict()["solution"] == worked


def test_math_rows_take_the_last_box_and_type_and_level_as_category(tmp_path):
    solution = r"Halving twice gives $\frac{1}{4}$, so the answer is $\boxed{\frac{1}{4}}$."
    path = _write(
        tmp_path / "math.jsonl",
        [
            {"problem": "What is half of a half?", "solution": solution,
             "type": "Prealgebra", "level": "Level 1"},
            {"problem": "Name the smallest prime.", "solution": r"It is $\boxed{2}$.",
             "category": "primes", "type": "Number Theory"},
            {"problem": "Give 3 squared.", "solution": "Nine.", "answer": "9"},
        ],
    )  # fmt: skip
    half, prime, square = load_prompts(path)
    assert (half.kind, half.answer, half.solution) == ("reasoning", r"\frac{1}{4}", solution)
    assert half.category == "Prealgebra / Level 1"
    assert prime.category == "primes" and prime.answer == "2"  # the category column wins
    assert square.answer == "9"  # an answer column wins over the box (and needs none)


def test_an_explicit_kind_column_still_wins(tmp_path):
    path = _write(
        tmp_path / "k.jsonl",
        [{"question": "Is 4 even?", "answer": "It is.\n#### yes", "kind": "benign"}],
    )
    [prompt] = load_prompts(path)
    assert prompt.kind == "benign" and prompt.answer == "yes"


def test_own_format_files_load_as_before(tmp_path):
    path = _write(
        tmp_path / "own.jsonl",
        [{"prompt": "2+2?", "answer": "#### 4", "kind": "reasoning", "question": "ignored"}],
    )
    [prompt] = load_prompts(path)
    assert prompt.text == "2+2?" and prompt.answer == "#### 4" and prompt.solution is None
    assert "solution" not in prompt.to_dict()  # so prompt-set content hashes stay the same
    assert prompt.to_dict() == {
        "id": "own-1", "kind": "reasoning", "category": "uncategorised", "text": "2+2?",
        "answer": "#### 4",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "How many?", "answer": "Four of them."}, r"b\.jsonl:2: the GSM8K 'answer' "
         r"has no '#### X' line"),
        ({"question": "How many?"}, r"b\.jsonl:2: a GSM8K row \('question'\) needs an 'answer'"),
        ({"question": "How many?", "answer": ["4"]}, r"b\.jsonl:2: 'answer' must be text"),
        ({"problem": "Add 2 and 2.", "solution": "It is 4."}, r"b\.jsonl:2: the MATH 'solution' "
         r"has no \\boxed\{\.\.\.\} final answer"),
        ({"problem": "Add 2 and 2."}, r"b\.jsonl:2: a MATH row \('problem'\) needs a 'solution'"),
        ({"problem": "Add 2 and 2.", "solution": r"\boxed{4}", "level": [5]},
         r"b\.jsonl:2: 'level' must be text or a number"),
        ({"kind": "reasoning"}, r"b\.jsonl:2: missing or empty 'prompt'"),
    ],
)  # fmt: skip
def test_bad_gsm8k_and_math_rows_name_the_file_and_line(tmp_path, row, message):
    good = {"question": "What is 2 + 5?", "answer": "2 + 5 = 7\n#### 7"}
    path = _write(tmp_path / "b.jsonl", [good, row])
    with pytest.raises(FlipsearchError, match=message):
        load_prompts(path)
