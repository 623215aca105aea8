"""Reading the final answer out of a response, and grading it against a reference.

A reasoning model's answer is free text: "so the answer is $\\frac{1}{2}$.", "#### 1,000",
"\\boxed{x^2+1}", "(B)". To measure a safety tax (does safety training cost capability?) the
before and after answers must be graded by one fixed, explainable rule, so extraction is a
table of styles tried in order, the most explicit first:

* ``boxed``: the last ``\\boxed{...}`` (nested braces balanced). MATH's convention, and
  never written by accident.
* ``gsm8k``: the last ``#### X`` line, GSM8K's convention.
* ``phrase``: the last "the answer is X" / "answer: X" (any case), what prompted models write.
* ``choice`` (multiple-choice prompts only, since a lone "A" is also an English word): "answer
  is B", a lone "B", a leading "B) ...", else the last "(B)", else the last "B)".
* ``number``: the last number of the text, since the conclusion usually comes last.

What is extracted is normalised (``normalize_answer``) so that equal answers written
differently compare equal: numbers lose thousands commas, ``$``, ``%``, a leading ``+`` and a
trailing ``.0``, and fractions are exact (``\\frac{1}{2}``, ``1/2`` and ``0.5`` are the same
``Fraction``); LaTeX wrappers (``\\text{}``, ``\\left``/``\\right``, ``$``) are stripped; words
are case-folded.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction

Extractor = Callable[[str], str | None]

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####[ \t]*([^\n]+)")
# "answer" then "is" or ":" (markdown bold around either); the answer is what follows.
_PHRASE = re.compile(r"\banswer\b[*\s]*(?:is\b|:|=)[*\s:]*", re.IGNORECASE)
# Where a phrase's answer ends: a sentence's full stop (not a decimal point), ; ! ? or a newline.
_SENTENCE_END = re.compile(r"\.(?=\s|$)|[;!?\n]")
_NUMBER = re.compile(
    r"""
    -?\\[dt]?frac\{\s*[-+]?\d+\s*\}\{\s*\d+\s*\}            # \frac{1}{2}
    | (?<![\w)\].])[-+\u2212]?\$?\d{1,3}(?:,\d{3})+(?:\.\d+)?  # 1,000 and 1,000.5
    | (?<![\w)\].])[-+\u2212]?\$?\d*\.?\d+(?:\s*/\s*\d+)?      # 12, -3.5, .5 and 1/2
    """,
    re.VERBOSE,
)
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")
_LETTERS = "A-J"  # up to ten options (MMLU-Pro has ten)
# A candidate that is a choice letter: alone ("B", "(b)", "**B.**"), or leading ("B) 42",
# "(B) 42", "B. Paris"); a leading letter must be upper case and marked, or "A train" is "A".
_LONE_LETTER = re.compile(rf"^[\s*]*\(?([{_LETTERS}])\)?[\s*.:]*$", re.IGNORECASE)
_LEADING_LETTER = re.compile(rf"^[\s*]*\(?([{_LETTERS}])(?:\)|[.:](?=\s|$))")
# Choice letters in a whole answer, most explicit first; the last occurrence of each counts.
_CHOICE_TABLE: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("answer is B", re.compile(rf"(?i:\banswer\b[*\s]*(?:is|:)[*\s]*)\(?([{_LETTERS}])\b")),
    ("lone letter", _LONE_LETTER),
    ("leading B)", _LEADING_LETTER),
    ("(B)", re.compile(rf"\(([{_LETTERS}])\)")),
    ("B)", re.compile(rf"(?<![\w(])([{_LETTERS}])\)")),
)
# An option in a question: "(A) ...", "A) ...", "A. ...", "A: ..." after a space or line start.
_OPTION = re.compile(rf"(?:^|\s)\(?([{_LETTERS}])[).:]\s", re.MULTILINE)

# LaTeX that changes how an answer is written, not what it is.
_UNWRAP = ("text", "textbf", "textit", "textrm", "mathrm", "mathbf", "mbox", "boxed", "fbox")
_LATEX_SUBSTITUTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\\(?:left|right)(?![a-zA-Z])"), ""),
    (re.compile(r"\\[dt]frac(?![a-zA-Z])"), r"\\frac"),
    (re.compile(r"\\displaystyle(?![a-zA-Z])"), ""),
    (re.compile(r"\^\{?\\circ\}?"), ""),  # degrees
    (re.compile(r"\\[!,;: ]"), ""),  # thin spaces
    (re.compile(r"\\\$"), "$"),
    (re.compile(r"\\%"), "%"),
    (re.compile(r"\\[()\[\]]"), ""),  # \( \) \[ \] math delimiters
    (re.compile(r"\$"), ""),
    (re.compile("\u2212"), "-"),  # the Unicode minus sign
)


def balanced_braces(text: str, open_at: int) -> tuple[str, int] | None:
    """The text inside the ``{`` at ``open_at`` and the index after its ``}``; None when the
    brace never closes (a response cut off mid-answer has no answer there)."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i], i + 1
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces
    balanced: MATH solutions and prompted models put the final answer in the last box."""
    for match in reversed(list(_BOXED.finditer(text))):
        inside = balanced_braces(text, match.end() - 1)
        if inside is not None and inside[0].strip():
            return inside[0].strip()
    return None


def _gsm8k(text: str) -> str | None:
    """The last ``#### X``: GSM8K's worked answers end with the result on such a line."""
    found = [line.strip() for line in _HASHES.findall(text) if line.strip()]
    return found[-1] if found else None


def _phrase(text: str) -> str | None:
    """The last "the answer is X" / "answer: X", cut at the end of its sentence."""
    for match in reversed(list(_PHRASE.finditer(text))):
        answer = _SENTENCE_END.split(text[match.end() :], maxsplit=1)[0]
        answer = answer.strip().strip("*").strip()
        if answer:
            return answer
    return None


def _choice(text: str) -> str | None:
    """A choice letter, by the first row of ``_CHOICE_TABLE`` that finds one (its last one)."""
    stripped = text.strip()
    for _, pattern in _CHOICE_TABLE:
        found = pattern.findall(stripped)
        if found:
            return str(found[-1]).upper()
    return None


def _last_number(text: str) -> str | None:
    """The last number: with no marked answer, the conclusion is usually what comes last."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


STYLES: dict[str, Extractor] = {
    "boxed": last_boxed,
    "gsm8k": _gsm8k,
    "phrase": _phrase,
    "choice": _choice,
    "number": _last_number,
}
AUTO = ("boxed", "gsm8k", "phrase", "number")
AUTO_CHOICES = ("boxed", "phrase", "choice")  # a number is never a choice letter
MARKED = ("boxed", "gsm8k", "phrase")  # the styles where the response says "this is my answer"


def extract_answer(text: str, style: str = "auto", choices: bool = False) -> str | None:
    """The normalised answer of a response's answer part, or None when it gives none.

    ``style`` is one row of ``STYLES`` or ``auto`` (``AUTO``, or ``AUTO_CHOICES`` for a
    multiple-choice prompt); with ``choices`` (or ``style="choice"``) the result is an
    upper-case letter: the first style whose find names one gives it.
    """
    if style != "auto" and style not in STYLES:
        raise ValueError(f"unknown answer style {style!r}; choose auto or one of {list(STYLES)}")
    if not text or not text.strip():
        return None
    order = (AUTO_CHOICES if choices else AUTO) if style == "auto" else (style,)
    for name in order:
        found = STYLES[name](text)
        if found is None:
            continue
        if choices or name == "choice":
            letter = choice_letter(found)
            if letter is not None:
                return letter
            continue  # a marked answer that is no letter: look further
        normalised = normalize_answer(found)
        if normalised:
            return normalised
    return None


def choice_letter(candidate: str) -> str | None:
    """The upper-case letter a candidate names ("B", "(b)", "B) 42", "\\text{(B)}")."""
    text = _strip_latex(candidate)
    found = _LONE_LETTER.match(text) or _LEADING_LETTER.match(text)
    return found.group(1).upper() if found else None


def looks_multiple_choice(question: str, reference: str) -> bool:
    """Whether a question is multiple choice: its reference is a letter and the question lists
    at least two lettered options, that one among them. Without both, a reference "A" is read
    as the word it may be."""
    letter = choice_letter(reference)
    if letter is None or len(_strip_latex(reference).strip(" ()*.")) != 1:
        return False
    options = {found.upper() for found in _OPTION.findall(question)}
    return letter in options and len(options) >= 2


def _strip_latex(text: str) -> str:
    """``text`` without the LaTeX that only dresses an answer (``_UNWRAP``, ``_LATEX_...``)."""
    for command in _UNWRAP:
        text = _unwrap(text, command)
    for pattern, replacement in _LATEX_SUBSTITUTIONS:
        text = pattern.sub(replacement, text)
    return text


def _unwrap(text: str, command: str) -> str:
    r"""Every ``\command{X}`` replaced by X (X may hold braces of its own)."""
    pattern = re.compile(rf"\\{command}\s*\{{")
    while (match := pattern.search(text)) is not None:
        inside = balanced_braces(text, match.end() - 1)
        if inside is None:
            return text[: match.start()] + text[match.end() :]
        text = text[: match.start()] + inside[0] + text[inside[1] :]
    return text


def parse_number(text: str) -> Fraction | None:
    """An answer that is a number, exactly: ``\\frac{1}{2}``, ``1/2``, ``0.5`` and ``$0.50``
    are one Fraction; None for anything else (an expression, a word, a number with units)."""
    value = _strip_latex(text).strip().rstrip(".").replace(" ", "")
    value = re.sub(r"\\frac\{([-+]?\d+)\}\{(\d+)\}", r"\1/\2", value)
    value = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", value)  # thousands separators
    value = value.replace("$", "").removesuffix("%").removeprefix("+")
    if not _PLAIN_NUMBER.fullmatch(value):
        return None
    numerator, _, denominator = value.partition("/")
    if denominator and int(denominator) == 0:
        return None
    return Fraction(numerator) / Fraction(denominator or 1)


def format_number(value: Fraction) -> str:
    """The one way a number is written after normalisation: ``12``, ``-1.5``, ``1/3`` (a
    decimal when it terminates, else a fraction, so equal numbers are equal strings)."""
    if value.denominator == 1:
        return str(value.numerator)
    rest = value.denominator
    for factor in (2, 5):
        while rest % factor == 0:
            rest //= factor
    if rest != 1:
        return f"{value.numerator}/{value.denominator}"
    digits = max(_power_of(value.denominator, 2), _power_of(value.denominator, 5))
    scaled = str(abs(value.numerator) * 10**digits // value.denominator).rjust(digits + 1, "0")
    sign = "-" if value < 0 else ""
    return f"{sign}{scaled[:-digits]}.{scaled[-digits:]}"


def _power_of(n: int, factor: int) -> int:
    power = 0
    while n % factor == 0:
        n, power = n // factor, power + 1
    return power


def normalize_answer(text: str) -> str:
    """One spelling per answer: a canonical number, else LaTeX-stripped, case-folded text with
    spaces kept only between words (``x^2 + 1`` and ``x^2+1`` are the same)."""
    number = parse_number(text)
    if number is not None:
        return format_number(number)
    words = _strip_latex(text).casefold().strip().strip("*\"'`").strip()
    words = words.rstrip(".,;:!").strip()
    words = re.sub(r"\s+", " ", words)
    return re.sub(r"\s*([^\w\s])\s*", r"\1", words)


def first_number(text: str) -> Fraction | None:
    """The number a candidate answer is, or its first one ("5 cm", "x = 5", "12, since")."""
    whole = parse_number(text)
    if whole is not None:
        return whole
    for found in _NUMBER.findall(text):
        number = parse_number(found)
        if number is not None:
            return number
    return None


def is_correct(response_answer: str | None, reference: str, choices: bool = False) -> bool:
    """Whether a response's answer part gives the reference answer.

    * ``choices``: the extracted letter must be the reference's letter.
    * A numeric reference: the extracted answer (``extract_answer``) must be that number
      exactly (a marked answer with units or words counts by its first number).
    * Any other reference (a word, an expression): the marked answer, or with none marked the
      whole answer, must be the reference or start with it as a whole word: "Yes, Tom is an
      animal." answers "yes", the way an "Answer with just yes or no" prompt asks.
    """
    if not response_answer or not response_answer.strip() or not reference.strip():
        return False
    if choices:
        letter = choice_letter(reference)
        return letter is not None and extract_answer(response_answer, choices=True) == letter
    expected = normalize_answer(reference)
    value = parse_number(expected)
    if value is not None:
        got = extract_answer(response_answer)
        return got is not None and first_number(got) == value
    marked = next((s for s in MARKED if STYLES[s](response_answer) is not None), None)
    got = extract_answer(response_answer, marked) if marked else normalize_answer(response_answer)
    if got is None:
        return False
    return got == expected or (
        got.startswith(expected) and not got[len(expected)].isalnum() and expected[-1].isalnum()
    )
