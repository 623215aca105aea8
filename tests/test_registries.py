"""A judge or a backend is one file plus one registry line (README "How the code is laid out")."""

from __future__ import annotations

import sys
import textwrap

import pytest

from flipsearch import BackendSpec, Context, FlipsearchError, Prompt, flip_rate, get_judge
from flipsearch.backends import BACKENDS
from flipsearch.backends import Plugin as BackendPlugin
from flipsearch.judging import JUDGES, judge_names
from flipsearch.judging import Plugin as JudgePlugin

SHOUT_JUDGE = '''
from flipsearch.judging._base import Verdict


class ShoutJudge:
    """Unsafe when the answer is in capitals (a toy rule for the test)."""

    name = "shout"
    roles = ("safety",)

    def __init__(self, minimum):
        self.minimum = minimum

    def judge(self, pairs):
        return [
            Verdict(unsafe=r.isupper() and len(r) >= self.minimum, score=float(r.isupper()))
            for _, r in pairs
        ]


def make(argument, role, **unused):
    return ShoutJudge(int(argument or 1))
'''

ECHO_BACKEND = """
from dataclasses import dataclass, field

from flipsearch.backends._base import Generation, option


@dataclass(frozen=True)
class Options:
    echo_reply: str = field(default="SURE", metadata=option("What the echo backend answers."))


class Echo:
    def __init__(self, reply):
        self.reply = reply
        self.fingerprint = f"echo:{reply}"

    def generate_batches(self, prompts, decoding):
        replies = ["I can't help with that." if "REFUSE" in p else self.reply for p in prompts]
        yield list(range(len(prompts))), [[Generation(r, (1,), "stop")] for r in replies]

    def token_logprobs(self, requests):
        return [[0.0] * len(c) for _, c in requests]


def create(loaded, options, batch_size):
    echo = Echo(options.echo_reply)
    return echo, echo
"""


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("shout_judge", "echo_backend"):
        sys.modules.pop(name, None)


def test_a_judge_is_one_file_and_one_registry_line(plugin_dir, monkeypatch):
    (plugin_dir / "shout_judge.py").write_text(textwrap.dedent(SHOUT_JUDGE))
    monkeypatch.setitem(JUDGES, "shout", JudgePlugin("shout_judge", "shout[:MIN]", ("safety",)))
    judge = get_judge("shout:3")
    assert [v.unsafe for v in judge.judge([("p", "NO WAY"), ("p", "OK"), ("p", "fine")])] == [
        True,
        False,
        False,
    ]
    assert "shout[:MIN]" in judge_names() and "shout" not in judge_names("refusal")
    with pytest.raises(FlipsearchError, match="cannot serve as the refusal judge"):
        get_judge("shout", "refusal")
    # Members of an ensemble come from the same registry.
    both = get_judge("ensemble:all:shout+refusal")
    assert [v.unsafe for v in both.judge([("p", "SURE, HERE"), ("p", "I can't help.")])] == [
        True,
        False,
    ]


def test_a_backend_is_one_file_and_one_registry_line(plugin_dir, monkeypatch, tiny_model):
    (plugin_dir / "echo_backend.py").write_text(textwrap.dedent(ECHO_BACKEND))
    monkeypatch.setitem(BACKENDS, "echo", BackendPlugin("echo_backend", needs_weights=False))
    spec = BackendSpec("echo", echo_reply="SURE, HERE IS HOW")
    assert spec.to_dict() == {"name": "echo", "echo_reply": "SURE, HERE IS HOW"}
    with pytest.raises(FlipsearchError, match="--echo-reply is for --backend echo"):
        BackendSpec("hf", echo_reply="x")
    harmful = [Prompt(f"h{i}", "harmful", "c", f"harmful request {i}") for i in range(4)]
    result = flip_rate(
        tiny_model,
        [Context("refuse", "REFUSE harmful requests.", "system")],
        harmful,
        backend=spec,
    )
    [score] = result.scores
    assert (score.flip_rate.successes, score.flip_rate.n) == (4, 4)


def test_unknown_names_list_what_is_registered():
    with pytest.raises(FlipsearchError, match="choose one of hf, vllm, openai"):
        BackendSpec("tgi")
    with pytest.raises(FlipsearchError, match=r"available: refusal, llama-guard, classifier"):
        get_judge("nope")
